"""The device-memory ledger: what every GPU process holds on each device, kept in Redis.

Each process that computes on a device (every GPU service through its DeviceGuard, the trainer
through its turn) reports, per device, the bytes of weights and buffers it holds there now and its
residency ("resident", "offloaded", "asleep"). A report is written when the residency changes, with
the lease still held: "resident" once the lease is granted and before the weights move in,
"offloaded" after they have left and before the lease is released. So the ledger of a device
shared through the lease never shows two processes resident at once unless one of them keeps its
weights there (residency keep), which the ledger then shows.

Keys: `speechrl:ledger:{<device>}` is a hash, field = the reporting owner, value = its entry as
JSON; an entry older than STALE_SECONDS belongs to a process that stopped reporting and is shown
as stale. On CUDA an entry also carries torch's memory_allocated / memory_reserved of the device.

    speechrl gpu status        # each device's lease holder and queue, and its ledger
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

NAMESPACE = "speechrl:ledger"
STALE_SECONDS = 3600.0  # a process that has not reported for this long is shown as stale


@dataclass(frozen=True)
class LedgerEntry:
    """What one process holds on one device."""

    owner: str  # the process, e.g. "encoder-1234", "trainer-5678"
    device: str  # e.g. "cuda:0"; a CPU run reports the name it leases ("cpu:0")
    residency: str  # "resident", "offloaded" or "asleep"
    weight_bytes: int  # bytes of weights and buffers this process believes are on the device now
    updated: float  # time.time() of the report
    pid: int = 0
    allocated_bytes: int = -1  # torch.cuda.memory_allocated of the device (CUDA only; -1: not known)
    reserved_bytes: int = -1  # torch.cuda.memory_reserved of the device (CUDA only; -1: not known)

    @property
    def resident(self) -> bool:
        return self.residency == "resident"

    def stale(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.updated > STALE_SECONDS


def ledger_key(device: str, namespace: str = NAMESPACE) -> str:
    return f"{namespace}:{{{device}}}"


def cuda_memory(device: str) -> tuple[int, int]:
    """(allocated, reserved) bytes of a CUDA device from torch, (-1, -1) elsewhere or without torch."""
    if not device.startswith("cuda"):
        return -1, -1
    try:
        import torch

        if not torch.cuda.is_available():
            return -1, -1
        return int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))
    except Exception:  # noqa: BLE001 - the ledger is reporting, never a reason to fail a batch
        return -1, -1


class DeviceLedger:
    """One process's reports to the ledger (a plain Redis client: it is called from model threads)."""

    def __init__(self, redis_url: str, owner: str, namespace: str = NAMESPACE):
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.owner = owner
        self.namespace = namespace
        self.last: dict[str, LedgerEntry] = {}  # this process's latest entry per device, for its own status

    def report(self, device: str, residency: str, weight_bytes: int) -> LedgerEntry:
        """Record what this process holds on device now. A Redis error is logged, never raised."""
        allocated, reserved = cuda_memory(device)
        entry = LedgerEntry(self.owner, device, residency, int(weight_bytes), time.time(), os.getpid(),
                            allocated, reserved)
        self.last[device] = entry
        try:
            self.client.hset(ledger_key(device, self.namespace), self.owner, json.dumps(asdict(entry)))
        except redis.RedisError as exc:
            log.warning("device ledger of %s: report failed (%s)", device, exc)
        return entry

    def withdraw(self) -> None:
        """Remove this process's entries (on shutdown)."""
        for device in list(self.last):
            try:
                self.client.hdel(ledger_key(device, self.namespace), self.owner)
            except redis.RedisError as exc:
                log.warning("device ledger of %s: withdraw failed (%s)", device, exc)
        self.last.clear()


def read_ledger(client: redis.Redis, device: str, namespace: str = NAMESPACE) -> list[LedgerEntry]:
    """Every entry of device's ledger, by owner."""
    raw: dict[Any, Any] = client.hgetall(ledger_key(device, namespace))  # type: ignore[assignment]
    entries = []
    for value in raw.values():
        values = json.loads(value)
        entries.append(LedgerEntry(**values))
    return sorted(entries, key=lambda e: e.owner)


def ledger_devices(client: redis.Redis, namespace: str = NAMESPACE) -> list[str]:
    """The devices that have a ledger."""
    prefix = f"{namespace}:{{"
    names = [key.decode() if isinstance(key, bytes) else key for key in client.scan_iter(match=f"{prefix}*")]
    return sorted(name[len(prefix):-1] for name in names)
