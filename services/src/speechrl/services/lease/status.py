"""What the lease looks like right now, for `speechrl gpu status` and service status replies: each
device's holder, queue and counters, and its device-memory ledger (what every process holds there)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from speechrl.services.lease.lease import LeaseSettings, device_prefix, lease_redis
from speechrl.services.ledger import LedgerEntry, ledger_devices, read_ledger


@dataclass
class DeviceStatus:
    """One device's holder, queue and counters."""

    device: str
    holder: str | None = None
    fence: int = 0
    held_for_s: float = 0.0
    ttl_left_ms: int = 0
    queue: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    memory: list[LedgerEntry] = field(default_factory=list)  # the device's ledger, by owner


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


async def device_status(client: aioredis.Redis, device: str, namespace: str = LeaseSettings.namespace) -> DeviceStatus:
    """The state of one device's lease."""
    p = device_prefix(namespace, device)
    status = DeviceStatus(device)
    ttl = await client.pttl(f"{p}:holder")
    info = {_text(k): _text(v) for k, v in (await client.hgetall(f"{p}:info")).items()}
    if ttl > 0 and info:
        status.holder = info.get("owner")
        status.fence = int(info.get("fence", 0))
        status.held_for_s = max(0.0, time.time() - int(info.get("granted_ms", 0)) / 1000)
        status.ttl_left_ms = int(ttl)
    tickets = [_text(t) for t in await client.zrange(f"{p}:queue", 0, -1)]
    owners = {_text(k): _text(v) for k, v in (await client.hgetall(f"{p}:owners")).items()}
    status.queue = [owners.get(t, "?") for t in tickets]
    status.stats = {_text(k): int(v) for k, v in (await client.hgetall(f"{p}:stats")).items()}
    if not status.fence:
        status.fence = int(await client.get(f"{p}:fence") or 0)
    return status


@dataclass(frozen=True)
class LeaseEvent:
    """One grant, release or expiry of a device's lease, as the lease scripts recorded it."""

    id: str          # the stream entry id, "<ms>-<seq>"
    device: str
    kind: str        # "grant" | "release" | "expire"
    owner: str       # the owner label the holder gave GpuLease(owner=...)
    fence: int
    at_ms: int       # Redis server clock, ms since the epoch
    held_ms: int     # release / expire: how long that grant was held (expire: until it was found lapsed); grant: 0
    waited_ms: int   # grant: how long the ticket waited in the queue; else 0
    queue: int       # tickets waiting after the event


async def lease_events(client: aioredis.Redis, device: str, *, namespace: str = LeaseSettings.namespace,
                       since_ms: int = 0, count: int = 10_000) -> list[LeaseEvent]:
    """The device's lease events from since_ms on (Redis clock), oldest first, at most the newest count.

    The stream is capped at LeaseSettings.events_max entries, so the oldest events of a long run are gone.
    """
    entries = await client.xrevrange(f"{device_prefix(namespace, device)}:events", "+", f"{since_ms}-0", count=count)
    events = []
    for entry_id, fields in reversed(entries or []):
        f = {_text(k): _text(v) for k, v in (fields or {}).items()}
        events.append(LeaseEvent(id=_text(entry_id), device=device, kind=f["kind"], owner=f["owner"],
                                 fence=int(f["fence"]), at_ms=int(f["at_ms"]), held_ms=int(f["held_ms"]),
                                 waited_ms=int(f["waited_ms"]), queue=int(f["queue"])))
    return events


async def known_devices(client: aioredis.Redis, namespace: str = LeaseSettings.namespace) -> list[str]:
    """Every device that has ever been granted or queued for."""
    devices = set()
    async for key in client.scan_iter(match=f"{namespace}:{{*}}:seq"):
        name = _text(key)
        devices.add(name[name.index("{") + 1:name.rindex("}")])
    return sorted(devices)


def _mib(value: int) -> str:
    return "-" if value < 0 else f"{value / 2**20:.1f} MiB"


def format_status(statuses: Sequence[DeviceStatus]) -> str:
    """A table of devices, holders and queues, each device's ledger below it."""
    if not statuses:
        return "no device has been leased yet"
    lines = [f"{'device':<10} {'holder':<22} {'fence':>16} {'held':>7} {'ttl':>7}  queue / counters"]
    for s in statuses:
        held = f"{s.held_for_s:.1f}s" if s.holder else "-"
        ttl = f"{s.ttl_left_ms}ms" if s.holder else "-"
        counters = " ".join(f"{k}={v}" for k, v in sorted(s.stats.items()))
        lines.append(f"{s.device:<10} {s.holder or 'free':<22} {s.fence:>16} {held:>7} {ttl:>7}  "
                     f"[{', '.join(s.queue)}] {counters}")
        for entry in s.memory:
            age = time.time() - entry.updated
            lines.append(f"{'':<10} {entry.owner:<22} {entry.residency:>16} {_mib(entry.weight_bytes):>12}  "
                         f"allocated {_mib(entry.allocated_bytes)}, reserved {_mib(entry.reserved_bytes)}, "
                         f"reported {age:.0f}s ago{' (stale)' if entry.stale() else ''}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechrl gpu", description="Show each device's lease holder and queue.")
    parser.add_argument("command", choices=["status"])
    parser.add_argument("--redis-url", default=os.environ.get("SPEECHRL_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="Redis of the lease (env SPEECHRL_REDIS_URL)")
    parser.add_argument("--device", action="append", help="only these devices (repeatable)")
    args = parser.parse_args(argv)

    async def run() -> str:
        client = lease_redis(args.redis_url)
        ledger = redis.Redis.from_url(args.redis_url, socket_timeout=5)
        try:
            devices = args.device or sorted({*await known_devices(client), *ledger_devices(ledger)})
            statuses = [await device_status(client, d) for d in devices]
            for status in statuses:
                status.memory = read_ledger(ledger, status.device)
            return format_status(statuses)
        finally:
            await client.aclose()
            ledger.close()

    print(asyncio.run(run()))
