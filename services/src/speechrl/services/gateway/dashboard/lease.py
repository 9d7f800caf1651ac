"""The lease panel: who held each device when, from the lease's own event stream (lease/status.py).

A grant opens a segment for its owner; the release or expiry with the same fence closes it. A
release whose grant is older than the window starts at `at_ms - held_ms`, clipped to the window. A
segment still open at the end is the current holder's ("open") when the device's holder has that
fence, else its holder stopped renewing and nobody has acquired since ("lapsed": the expiry is
recorded only when the next acquirer finds it). Times are the Redis server's clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from speechrl.services.lease.lease import owner_label
from speechrl.services.lease.status import LeaseEvent, device_status, known_devices, lease_events
from speechrl.services.ledger import ledger_devices, read_ledger

MAX_SEGMENTS = 1500  # per device and reply: ~1 per pixel of the page's timeline, ~150 KB of JSON


@dataclass(frozen=True)
class Segment:
    """One holder's turn on a device, [start_ms, end_ms] on the Redis clock."""

    owner: str
    fence: int
    start_ms: int
    end_ms: int
    end: str  # "release", "expire", "open" (the current holder) or "lapsed" (not renewed, not yet expired)


@dataclass(frozen=True)
class Holder:
    """The device's current holder, as device_status reads it."""

    owner: str
    fence: int
    held_ms: int


def segments(events: Sequence[LeaseEvent], now_ms: int, since_ms: int, holder: Holder | None = None) -> list[Segment]:
    """The holders' segments over [since_ms, now_ms] from events (oldest first), by start.

    >>> E = lambda kind, owner, fence, at, held=0: LeaseEvent(f"{at}-0", "cpu:0", kind, owner, fence, at, held, 0, 0)
    >>> for s in segments([E("release", "a", 1, 150, held=100), E("grant", "b", 2, 160), E("expire", "b", 2, 400, held=240),
    ...                    E("grant", "c", 3, 400)], now_ms=500, since_ms=100, holder=Holder("c", 3, 100)):
    ...     print(s.owner, s.start_ms, s.end_ms, s.end)
    a 100 150 release
    b 160 400 expire
    c 400 500 open
    """
    opened: dict[int, tuple[str, int]] = {}  # fence -> (owner, start)
    closed: list[Segment] = []
    for event in events:
        if event.kind == "grant":
            opened[event.fence] = (event.owner, event.at_ms)
        elif event.kind in ("release", "expire"):
            owner, start = opened.pop(event.fence, (event.owner, event.at_ms - event.held_ms))
            closed.append(Segment(owner, event.fence, max(start, since_ms), event.at_ms, event.kind))
    for fence, (owner, start) in opened.items():
        current = holder is not None and holder.fence == fence
        closed.append(Segment(owner, fence, max(start, since_ms), now_ms, "open" if current else "lapsed"))
    seen = {s.fence for s in closed}
    if holder is not None and holder.fence not in seen:  # granted before the window and still held
        closed.append(Segment(holder.owner, holder.fence, max(since_ms, now_ms - holder.held_ms), now_ms, "open"))
    return sorted(closed, key=lambda s: (s.start_ms, s.fence))


def coalesce(segments: Sequence[Segment], gap_ms: int) -> list[Segment]:
    """Each owner's released segments joined with its next one when the gap between them is at most
    gap_ms: what a busy device's hour looks like at screen resolution, in a bounded reply.

    >>> S = lambda owner, fence, start, end, kind="release": Segment(owner, fence, start, end, kind)
    >>> [(s.owner, s.start_ms, s.end_ms, s.end) for s in coalesce(
    ...     [S("a", 1, 0, 10), S("b", 2, 11, 12), S("a", 3, 13, 20, "expire"), S("a", 4, 90, 99, "open")], gap_ms=5)]
    [('a', 0, 20, 'expire'), ('b', 11, 12, 'release'), ('a', 90, 99, 'open')]
    """
    merged: list[Segment] = []
    last: dict[str, int] = {}  # owner -> index of its latest segment in merged
    for s in sorted(segments, key=lambda s: s.start_ms):
        i = last.get(s.owner)
        if i is not None and merged[i].end == "release" and s.start_ms - merged[i].end_ms <= gap_ms:
            merged[i] = Segment(s.owner, merged[i].fence, merged[i].start_ms, s.end_ms, s.end)
        else:
            last[s.owner] = len(merged)
            merged.append(s)
    return merged


def percentiles(values: Sequence[int]) -> dict[str, int | None]:
    """Nearest-rank p50 / p90 / p99, max and count of values (ms).

    >>> percentiles(list(range(1, 101)))
    {'count': 100, 'p50': 50, 'p90': 90, 'p99': 99, 'max': 100}
    >>> percentiles([])["p50"] is None
    True
    """
    ordered = sorted(values)
    out: dict[str, int | None] = {"count": len(ordered)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        out[name] = ordered[max(0, math.ceil(len(ordered) * q) - 1)] if ordered else None
    out["max"] = ordered[-1] if ordered else None
    return out


async def device_view(client: aioredis.Redis, ledger: redis.Redis, device: str, now_ms: int, since_ms: int,
                      namespace: str) -> dict[str, Any]:
    """One device's timeline, queue, counters, percentiles and ledger."""
    status = await device_status(client, device, namespace)
    events = await lease_events(client, device, namespace=namespace, since_ms=since_ms)
    holder = Holder(status.holder, status.fence, int(status.held_for_s * 1000)) if status.holder else None
    drawn = segments(events, now_ms, since_ms, holder)
    if len(drawn) > MAX_SEGMENTS:  # finer than the page can draw: join each owner's nearby turns
        drawn = coalesce(drawn, (now_ms - since_ms) // MAX_SEGMENTS)
    entries = await asyncio.to_thread(read_ledger, ledger, device)
    now = time.time()
    return {
        "device": device,
        "holder": status.holder,
        "fence": status.fence if status.holder else 0,
        "queue": status.queue,
        "stats": status.stats,
        "segments": [{**asdict(s), "role": owner_label(s.owner)} for s in drawn],
        "expiries": [{"owner": e.owner, "fence": e.fence, "at_ms": e.at_ms, "held_ms": e.held_ms}
                     for e in events if e.kind == "expire"],
        "wait_ms": percentiles([e.waited_ms for e in events if e.kind == "grant"]),
        "hold_ms": percentiles([e.held_ms for e in events if e.kind in ("release", "expire")]),
        "window_counts": {kind: sum(e.kind == kind for e in events) for kind in ("grant", "release", "expire")},
        "ledger": [{**asdict(e), "stale": e.stale(now)} for e in entries],
    }


async def lease_view(client: aioredis.Redis, ledger: redis.Redis, window_s: float,
                     namespace: str = "speechrl:lease") -> dict[str, Any]:
    """Every device's view over the last window_s seconds of the Redis clock."""
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    since_ms = now_ms - int(window_s * 1000)
    devices = sorted({*await known_devices(client, namespace), *await asyncio.to_thread(ledger_devices, ledger)})
    views = await asyncio.gather(*(device_view(client, ledger, d, now_ms, since_ms, namespace) for d in devices))
    return {"now_ms": now_ms, "since_ms": since_ms, "devices": list(views), "error": ""}
