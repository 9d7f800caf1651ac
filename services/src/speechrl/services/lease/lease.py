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

Redis restarts. A restart without persistence (or one that loses the last second of an
append-only file) forgets the holder while the holder's batch is still running; it hears of
it only at its next heartbeat. Three rules keep "at most one holder" and "fences only grow":

1. The holder polices itself: it counts its lease as lost `ttl_ms - heartbeat/2` after sending
   the last renewal that Redis confirmed (its Redis-side TTL started later than that send), so
   when Redis is unreachable or paused it stops before anyone could be granted. `Grant.lost` is
   set; DeviceGuard fails the batch with UNAVAILABLE (a LeaseLost) and the client retries it.
2. A Redis whose uptime is below the TTL grants nothing new (a quiet period): any holder from
   before the restart either renews within it, and its renewal re-creates its hold with its
   ticket and fence ("reclaim", scripts.RENEW), or has policed itself off by the end of it, since
   its last confirmed renewal came before the restart. So no two holders overlap.
3. A missing fence counter is created from the server clock in microseconds, above every fence
   of the lost state (that counter grew by one per grant, far slower than a microsecond clock).

The quiet period also delays the first grant on a brand-new Redis by one TTL (Redis cannot tell
"new" from "restarted"). Whoever knows a server started empty with nobody holding anything (a
deployment's first start, a test fixture) can call `declare_clean_start`, which records that
server's run_id; the marker never matches a later run, so a restart still gets its quiet period.
Assumed: the Redis host's clock does not jump back across a restart, and every user of a device
shares one `ttl_ms` (the quiet period uses the asker's TTL). A failover to a replica that missed
the newest writes is not covered (the same limit as redis-py's Lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from speechrl.services.lease import scripts

log = logging.getLogger(__name__)

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
"""Priority classes: a lower rank is served first; FIFO within a class. The trainer's policy
update asks for "high" so scorer traffic cannot starve it."""

# Up to 10 min: a scorer waits milliseconds to seconds, the trainer's update up to its 600 s timeout,
# and the lease-wait alert's 30 s bound (k8s/components/monitoring/alerts.yml) must lie inside the
# range: histogram_quantile reads a quantile above the top finite bucket as that bucket.
LEASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_SECONDS = Histogram("speechrl_lease_wait_seconds", "Time from asking for a lease to its grant",
                         ["device", "owner"], buckets=LEASE_BUCKETS)
HOLD_SECONDS = Histogram("speechrl_lease_hold_seconds", "Time a lease was held", ["device", "owner"],
                         buckets=LEASE_BUCKETS)
LEASE_EVENTS = Counter("speechrl_lease_events_total", "Lease events seen by owner: granted, released, "
                       "release_after_loss, lost (lapsed under its holder), reclaimed (after a Redis restart), "
                       "expired (a dead holder's grant this owner found lapsed)", ["device", "owner", "event"])


def owner_label(owner: str) -> str:
    """An owner without its trailing process id: the metrics' `owner` label (restarts add no series) and
    the dashboard's colour of a holder.

    >>> owner_label("encoder-1234"), owner_label("rollout:99"), owner_label("token2wav-score-7"), owner_label("holder")
    ('encoder', 'rollout', 'token2wav-score', 'holder')
    """
    return re.sub(r"[-:]\d+$", "", owner) or owner


class LeaseError(RuntimeError):
    """Base of the lease's errors."""


class LeaseTimeout(LeaseError):
    """The lease was not granted within the wait timeout."""


class LeaseUnavailable(LeaseError):
    """Redis could not be reached; the caller should answer UNAVAILABLE and retry later."""


class LeaseLost(LeaseError):
    """The lease lapsed while work ran under it (no heartbeat got through in time, or a Redis
    restart could not be reclaimed): the work's result must not be used; retry it."""


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
    events_max: int = 10_000
    """Length cap of each device's event stream (grants, releases, expiries; status.lease_events):
    about 100 bytes an event, so 1 MB a device by default, however long the stack runs."""

    def __post_init__(self) -> None:
        if self.ttl_ms < 100:
            raise ValueError(f"ttl_ms must be >= 100, got {self.ttl_ms}")
        if self.events_max < 1:
            raise ValueError(f"events_max must be >= 1, got {self.events_max}")
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
    confirmed_at: float = 0.0
    """Clock time at which the last grant or renewal that Redis confirmed was sent: the holder
    counts its lease as lost a little less than a TTL after this (see the module docstring)."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a heartbeat found the lease gone or none got through in time: stop GPU work,
    the device may be someone else's."""


def clean_start_key(namespace: str) -> str:
    """Where `declare_clean_start` records a server's run_id (outside any device's hash tag: it is
    read by a plain GET and handed to the scripts as an argument)."""
    return f"{namespace}:clean-start"


def lease_redis(url: str) -> aioredis.Redis:
    """The asyncio Redis client a lease should use: a Redis that stops answering (paused, partitioned)
    fails its calls within seconds, as LeaseUnavailable, instead of hanging a waiter or a release
    forever. The read timeout stays well above the longest blocking call (BLPOP of one poll_ms)."""
    return aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def declare_clean_start(client: redis.Redis, namespace: str = "speechrl:lease") -> str:
    """Declare that the Redis behind client started empty and nobody holds a lease from before,
    so it needs no post-restart quiet period. Only for a server you just started yourself.

        declare_clean_start(redis.Redis.from_url("redis://127.0.0.1:6379/0"))
    """
    run_id = str(client.info("server")["run_id"])
    client.set(clean_start_key(namespace), run_id)
    return run_id


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
        self._label = owner_label(owner)
        self._acquire = client.register_script(scripts.ACQUIRE)
        self._renew = client.register_script(scripts.RENEW)
        self._release = client.register_script(scripts.RELEASE)
        self._cancel = client.register_script(scripts.CANCEL)
        self._clean_run_id = ""  # see declare_clean_start; read when a reply says "recovering"

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
                sent = self.clock()
                state, value, expired, recovering = await self._acquire(
                    keys=[k["holder"], k["info"], k["queue"], k["fence"], k["seq"], k["stats"], k["owners"]],
                    args=[ticket, s.ttl_ms, s.waiter_ttl_ms, PRIORITIES[priority], self.owner, p, int(enqueue),
                          self._clean_run_id, s.events_max])
                enqueue = False
                if expired:
                    LEASE_EVENTS.labels(device, self._label, "expired").inc()
                if state == 1:
                    WAIT_SECONDS.labels(device, self._label).observe(self.clock() - start)
                    LEASE_EVENTS.labels(device, self._label, "granted").inc()
                    LEASE_EVENTS.labels(device, self._label, "lost")  # at 0 from here: increase() sees a first loss
                    return Grant(device, ticket, int(value), self.clock(), confirmed_at=sent)
                if recovering:  # maybe this server was declared clean since we last looked
                    known = self._clean_run_id
                    await self._read_clean_marker()
                    if self._clean_run_id != known:
                        continue  # ask again at once, with the marker: a clean server grants without a poll's wait
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

    async def _read_clean_marker(self) -> None:
        marker = await self.client.get(clean_start_key(self.settings.namespace))
        self._clean_run_id = marker.decode() if isinstance(marker, bytes) else (marker or "")

    def _mark_lost(self, grant: Grant, why: str) -> None:
        if not grant.lost.is_set():
            grant.lost.set()
            LEASE_EVENTS.labels(grant.device, self._label, "lost").inc()
            log.error("lease %s lost by %s (fence %d): %s", grant.device, self.owner, grant.fence, why)

    async def renew(self, grant: Grant) -> bool:
        """Extend the grant's TTL (re-creating it after a Redis restart, within the quiet period);
        False (and grant.lost set) when it had already lapsed or someone else holds the device."""
        _, k = self._keys(grant.device)
        sent = self.clock()
        if sent >= self.lost_after(grant):  # paused past our own deadline: too late to renew safely
            self._mark_lost(grant, "no renewal was confirmed within the TTL")
            return False
        outcome = int(await self._renew(keys=[k["holder"], k["info"], k["fence"], k["stats"]],
                                        args=[grant.ticket, self.settings.ttl_ms, grant.fence, self.owner,
                                              self._clean_run_id]))
        if outcome == 0:
            self._mark_lost(grant, "TTL ran out before a heartbeat, or a restarted Redis could not be reclaimed")
            return False
        if outcome == 2:
            LEASE_EVENTS.labels(grant.device, self._label, "reclaimed").inc()
            log.warning("lease %s reclaimed by %s (fence %d) after Redis lost it", grant.device, self.owner, grant.fence)
        grant.confirmed_at = max(grant.confirmed_at, sent)
        return True

    def still_held(self, grant: Grant) -> bool:
        """Whether work may go on under grant: not lost, and within its own deadline even when the
        heartbeat task has not run yet (the holder checks this before each unit of work)."""
        return not grant.lost.is_set() and self.clock() < self.lost_after(grant)

    def lost_after(self, grant: Grant) -> float:
        """Clock time from which grant counts as lost unless a renewal is confirmed: half a
        heartbeat before its Redis-side TTL can run out, a margin for the holder to notice."""
        s = self.settings
        return grant.confirmed_at + (s.ttl_ms - s.heartbeat_interval_ms / 2) / 1000

    async def release(self, grant: Grant) -> bool:
        """Give the lease back and wake the next waiter; False when it had already lapsed."""
        p, k = self._keys(grant.device)
        released = bool(await self._release(keys=[k["holder"], k["info"], k["queue"], k["stats"], k["owners"]],
                                            args=[grant.ticket, p, self.settings.events_max]))
        HOLD_SECONDS.labels(grant.device, self._label).observe(self.clock() - grant.granted_at)
        LEASE_EVENTS.labels(grant.device, self._label, "released" if released else "release_after_loss").inc()
        return released

    async def _heartbeat(self, grant: Grant, stop: asyncio.Event) -> None:
        """Renew grant until it is lost or stop is set. hold() also cancels this task to cut a sleep
        short, but a cancel can be swallowed on Python 3.11: redis-py wraps its socket writes in
        asyncio.wait_for, which returns the write's result instead of raising a cancel that lands
        as the write completes. So the loop ends on stop, not on cancellation alone."""
        interval = self.settings.heartbeat_interval_ms / 1000
        next_beat = self.clock() + interval
        while not grant.lost.is_set() and not stop.is_set():
            # Wake for the next beat, or at our own deadline when renewals are failing.
            await asyncio.sleep(max(0.0, min(next_beat, self.lost_after(grant)) - self.clock()))
            if self.clock() >= self.lost_after(grant):
                self._mark_lost(grant, "no renewal was confirmed within the TTL (Redis unreachable?)")
                return
            next_beat = self.clock() + interval
            try:
                # A renewal still in flight at our deadline is too late to count (asyncio.timeout:
                # unlike wait_for, it runs the renewal in this task and passes hold()'s cancel on).
                async with asyncio.timeout(max(self.lost_after(grant) - self.clock(), 0.001)):
                    renewed = await self.renew(grant)
                if not renewed:
                    return
            except (RedisError, TimeoutError) as exc:  # keep trying until our deadline
                log.warning("lease %s heartbeat failed: %s", grant.device, exc or type(exc).__name__)
                next_beat = min(next_beat, self.clock() + self.settings.poll_ms / 1000)

    @contextlib.asynccontextmanager
    async def hold(self, device: str, priority: str = "normal", timeout: float | None = None) -> AsyncIterator[Grant]:
        """Acquire, heartbeat while the body runs, release on exit (also on error or cancellation)."""
        grant = await self.acquire(device, priority, timeout)
        stop = asyncio.Event()
        beat = asyncio.create_task(self._heartbeat(grant, stop), name=f"lease-heartbeat-{device}")
        try:
            yield grant
        finally:
            stop.set()
            beat.cancel()
            try:
                # Not `await beat` under suppress(CancelledError): that would also swallow a cancel
                # of this task that arrives while the heartbeat stops.
                await asyncio.wait([beat])
            finally:
                try:
                    await self.release(grant)
                except RedisError as exc:  # the TTL frees the device anyway
                    log.warning("lease %s release failed (%s); it lapses after its TTL", device, exc)
