"""The GPU lease: per device a FIFO queue in Redis and at most one holder (the paper's alternating
GPU allocation).

    lease = GpuLease(redis.asyncio.Redis.from_url(url), owner="intelligibility")
    async with lease.hold("cuda:0") as grant:   # waits its turn, heartbeats while held
        ...                                      # GPU work; grant.fence orders writes downstream

A grant's TTL lives in Redis and is renewed by a heartbeat task every `heartbeat_ms`; a holder
that dies or loses the network stops renewing and loses the lease when its TTL runs out, and the
next live waiter gets it. Waiters refresh their own liveness key while they wait; a waiter that
dies is skipped. Every grant carries a fencing token that only grows, so a component that acts on
behalf of a lease holder (a rollout server taking new weights, a checkpoint writer) can refuse a
stale holder whose lease lapsed during a pause (Kleppmann's note on fencing tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from speechrl.services.lease import scripts

log = logging.getLogger(__name__)

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
"""Priority classes: a lower rank is served first; FIFO within a class. The trainer's policy
update asks for "high" so scorer traffic cannot starve it."""

WAIT_SECONDS = Histogram("speechrl_lease_wait_seconds", "Time from asking for a lease to its grant", ["device"])
HOLD_SECONDS = Histogram("speechrl_lease_hold_seconds", "Time a lease was held", ["device"])
LEASE_EVENTS = Counter("speechrl_lease_events_total", "Lease grants, releases and losses", ["device", "event"])


class LeaseError(RuntimeError):
    """Base of the lease's errors."""


class LeaseTimeout(LeaseError):
    """The lease was not granted within the wait timeout."""


class LeaseUnavailable(LeaseError):
    """Redis could not be reached; the caller should answer UNAVAILABLE and retry later."""


@dataclass(frozen=True)
class LeaseSettings:
    """Timing of the lease. Defaults suit batches of seconds; see each field."""

    ttl_ms: int = 10_000
    """How long a grant lives without a heartbeat: a dead holder blocks the device this long."""
    heartbeat_ms: int = 0
    """How often the holder renews its TTL; 0 means ttl_ms / 3."""
    waiter_ttl_ms: int = 3_000
    """How long a waiter stays queued without polling; a dead waiter is skipped after this."""
    poll_ms: int = 100
    """Longest sleep between a waiter's attempts when no release wakes it (e.g. a holder died)."""
    namespace: str = "speechrl:lease"
    """Prefix of every Redis key."""

    def __post_init__(self) -> None:
        if self.ttl_ms < 100:
            raise ValueError(f"ttl_ms must be >= 100, got {self.ttl_ms}")
        if self.heartbeat_interval_ms >= self.ttl_ms:
            raise ValueError(f"heartbeat_ms ({self.heartbeat_interval_ms}) must be below ttl_ms ({self.ttl_ms})")
        if self.poll_ms * 2 >= self.waiter_ttl_ms:
            raise ValueError(f"waiter_ttl_ms ({self.waiter_ttl_ms}) must exceed twice poll_ms ({self.poll_ms}), "
                             "or live waiters get skipped")

    @property
    def heartbeat_interval_ms(self) -> int:
        return self.heartbeat_ms or self.ttl_ms // 3


@dataclass
class Grant:
    """A granted lease. `ticket` is the secret that renews and releases it; `fence` orders grants."""

    device: str
    ticket: str
    fence: int
    granted_at: float
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a heartbeat found the lease gone: stop GPU work, the device is someone else's."""


def device_prefix(namespace: str, device: str) -> str:
    """The key prefix of one device; the braces make it a Redis Cluster hash tag."""
    return f"{namespace}:{{{device}}}"


class GpuLease:
    """Takes turns on named devices (`cuda:0`, `cpu:0`) through Redis. One instance per process."""

    def __init__(self, client: aioredis.Redis, owner: str, settings: LeaseSettings | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.owner = owner
        self.settings = settings or LeaseSettings()
        self.clock = clock
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)

    def _keys(self, device: str) -> tuple[str, dict[str, str]]:
        p = device_prefix(self.settings.namespace, device)
        names = ("holder", "info", "queue", "fence", "seq", "stats", "owners")
        return p, {n: f"{p}:{n}" for n in names}

    async def acquire(self, device: str, priority: str = "normal", timeout: float | None = None) -> Grant:
        """Wait for the device's lease (FIFO within priority). Raises LeaseTimeout or LeaseUnavailable."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        p, k = self._keys(device)
        ticket = secrets.token_hex(16)
        start = self.clock()
        deadline = None if timeout is None else start + timeout
        enqueue = True
        s = self.settings
        try:
            while True:
                state, value, expired = await self._acquire(
                    keys=[k["holder"], k["info"], k["queue"], k["fence"], k["seq"], k["stats"], k["owners"]],
                    args=[ticket, s.ttl_ms, s.waiter_ttl_ms, PRIORITIES[priority], self.owner, p, int(enqueue)])
                enqueue = False
                if expired:
                    LEASE_EVENTS.labels(device, "expired").inc()
                if state == 1:
                    WAIT_SECONDS.labels(device).observe(self.clock() - start)
                    LEASE_EVENTS.labels(device, "granted").inc()
                    return Grant(device, ticket, int(value), self.clock())
                if state == -1:  # we paused longer than waiter_ttl_ms and were skipped: rejoin at the back
                    log.warning("lease %s: waiter %s was dropped as dead; re-queueing", device, self.owner)
                    enqueue = True
                    continue
                wait_s = s.poll_ms / 1000
                if deadline is not None:
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        holder = await self.client.hget(k["info"], "owner")
                        owner = holder.decode() if isinstance(holder, bytes) else (holder or "nobody")
                        raise LeaseTimeout(f"lease of {device} not granted within {timeout:g} s: "
                                           f"held by {owner}, we were at "
                                           f"queue position {int(value) + 1}")
                    wait_s = min(wait_s, remaining)
                # Woken at once by a release, else re-checked each poll (a dead holder only times out).
                await self.client.blpop([f"{p}:notify:{ticket}"], timeout=max(wait_s, 0.01))
        except RedisError as exc:
            raise LeaseUnavailable(f"lease of {device}: Redis unreachable ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            with contextlib.suppress(RedisError, asyncio.CancelledError):
                await self._cancel(keys=[k["queue"], k["owners"]], args=[ticket, p])
            raise

    async def renew(self, grant: Grant) -> bool:
        """Extend the grant's TTL; False (and grant.lost set) when it had already lapsed."""
        _, k = self._keys(grant.device)
        ok = bool(await self._renew(keys=[k["holder"]], args=[grant.ticket, self.settings.ttl_ms]))
        if not ok and not grant.lost.is_set():
            grant.lost.set()
            LEASE_EVENTS.labels(grant.device, "lost").inc()
            log.error("lease %s lost by %s (fence %d): TTL ran out before a heartbeat", grant.device, self.owner, grant.fence)
        return ok

    async def release(self, grant: Grant) -> bool:
        """Give the lease back and wake the next waiter; False when it had already lapsed."""
        p, k = self._keys(grant.device)
        released = bool(await self._release(keys=[k["holder"], k["info"], k["queue"], k["stats"], k["owners"]],
                                            args=[grant.ticket, p]))
        HOLD_SECONDS.labels(grant.device).observe(self.clock() - grant.granted_at)
        LEASE_EVENTS.labels(grant.device, "released" if released else "release_after_loss").inc()
        return released

    async def _heartbeat(self, grant: Grant) -> None:
        interval = self.settings.heartbeat_interval_ms / 1000
        while not grant.lost.is_set():
            await asyncio.sleep(interval)
            try:
                if not await self.renew(grant):
                    return
            except RedisError as exc:  # keep trying: the TTL still protects the device meanwhile
                log.warning("lease %s heartbeat failed: %s", grant.device, exc)

    @contextlib.asynccontextmanager
    async def hold(self, device: str, priority: str = "normal", timeout: float | None = None) -> AsyncIterator[Grant]:
        """Acquire, heartbeat while the body runs, release on exit (also on error or cancellation)."""
        grant = await self.acquire(device, priority, timeout)
        beat = asyncio.create_task(self._heartbeat(grant), name=f"lease-heartbeat-{device}")
        try:
            yield grant
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            try:
                await self.release(grant)
            except RedisError as exc:  # the TTL frees the device anyway
                log.warning("lease %s release failed (%s); it lapses after its TTL", device, exc)
