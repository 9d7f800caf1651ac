"""The GPU lease on a real Redis: FIFO, priorities, tokens, fencing, heartbeats, kills, Redis outages."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from speechrl.services.lease import GpuLease, LeaseSettings, LeaseTimeout, LeaseUnavailable
from speechrl.services.lease.lease import device_prefix
from speechrl.services.lease.status import device_status, format_status, known_devices, lease_events
from tests.support.servers import RedisServer

WORKER = Path(__file__).parents[1] / "support" / "lease_worker.py"
FAST = LeaseSettings(ttl_ms=1000, waiter_ttl_ms=600, poll_ms=50)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


async def test_grant_release_and_fencing_tokens_grow(client: aioredis.Redis) -> None:
    lease = GpuLease(client, "a", FAST)
    first = await lease.acquire("cpu:0")
    assert await lease.release(first)
    second = await lease.acquire("cpu:0")
    assert second.fence > first.fence
    assert not await lease.release(first), "a stale ticket must not release the current grant"
    assert not await lease.renew(first)
    assert await lease.release(second)


async def test_fifo_order_and_priority_classes(client: aioredis.Redis) -> None:
    holder = GpuLease(client, "holder", FAST)
    grant = await holder.acquire("cpu:0")
    order: list[str] = []

    async def take(name: str, priority: str) -> None:
        lease = GpuLease(client, name, FAST)
        async with lease.hold("cpu:0", priority=priority):
            order.append(name)

    tasks = []
    for name, priority in [("n1", "normal"), ("n2", "normal"), ("low", "low"), ("update", "high")]:
        tasks.append(asyncio.create_task(take(name, priority)))
        await asyncio.sleep(0.05)  # arrival order
    status = await device_status(client, "cpu:0")
    assert status.holder == "holder" and status.queue == ["update", "n1", "n2", "low"]
    await holder.release(grant)
    await asyncio.gather(*tasks)
    assert order == ["update", "n1", "n2", "low"]


async def test_release_hands_off_fast(client: aioredis.Redis) -> None:
    a, b = GpuLease(client, "a", LeaseSettings(poll_ms=1000, waiter_ttl_ms=5000)), GpuLease(client, "b")
    grant = await a.acquire("cpu:0")
    waiter = asyncio.create_task(b.acquire("cpu:0"))
    await asyncio.sleep(0.1)
    start = time.monotonic()
    await a.release(grant)
    await waiter
    assert time.monotonic() - start < 0.5, "the release must wake the waiter, not leave it to its 1 s poll"


async def test_wait_timeout_is_a_clear_error_with_an_injected_clock(client: aioredis.Redis) -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0  # every look at the clock is a second later
        return now[0]

    holder = GpuLease(client, "trainer", FAST)
    grant = await holder.acquire("cuda:0")
    waiter = GpuLease(client, "scorer", FAST, clock=clock)
    with pytest.raises(LeaseTimeout, match=r"cuda:0 not granted within 3 s: held by trainer"):
        await waiter.acquire("cuda:0", timeout=3)
    assert (await device_status(client, "cuda:0")).queue == [], "a waiter that gives up leaves the queue"
    await holder.release(grant)


async def test_heartbeat_keeps_a_long_hold_and_a_silent_holder_loses_it(client: aioredis.Redis) -> None:
    lease = GpuLease(client, "a", FAST)
    async with lease.hold("cpu:0") as grant:
        await asyncio.sleep(2.5)  # 2.5 TTLs: only the heartbeat keeps it
        assert not grant.lost.is_set()
        assert (await device_status(client, "cpu:0")).holder == "a"
    silent = await lease.acquire("cpu:0")  # no heartbeat
    await asyncio.sleep(1.2)
    other = await GpuLease(client, "b", FAST).acquire("cpu:0", timeout=2)
    assert other.fence > silent.fence
    assert not await lease.renew(silent) and silent.lost.is_set()
    stats = (await device_status(client, "cpu:0")).stats
    assert stats["expiries"] == 1


def test_eight_processes_never_overlap_and_fences_increase(redis_server: RedisServer, tmp_path: Path) -> None:
    out = tmp_path / "intervals.txt"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "contend", redis_server.url, "cuda:0", "25", str(out)])
             for _ in range(8)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    rows = sorted((int(f), float(s), float(e)) for f, s, e in (line.split() for line in out.read_text().splitlines()))
    assert len(rows) == 200
    fences = [r[0] for r in rows]
    assert fences == sorted(set(fences)), "fencing tokens are unique"
    for (f1, _, end1), (f2, start2, _) in zip(rows, rows[1:], strict=False):
        assert start2 >= end1, f"grant {f2} started before grant {f1} ended"


async def test_a_killed_holder_loses_the_lease_within_its_ttl(redis_server: RedisServer, client: aioredis.Redis) -> None:
    ttl_ms = 1000
    holder = subprocess.Popen([sys.executable, str(WORKER), "hold", redis_server.url, "cuda:0", str(ttl_ms)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        first = holder.stdout.readline().split()
        assert first[0] == "granted"
        holder.kill()
        holder.wait()
        killed_at = time.monotonic()
        grant = await GpuLease(client, "next", FAST).acquire("cuda:0", timeout=10)
        waited = time.monotonic() - killed_at
        assert waited <= (ttl_ms + ttl_ms / 3) / 1000 + FAST.poll_ms / 1000 + 0.1, waited
        assert (await device_status(client, "cuda:0")).stats.get("expiries") == 1
        assert grant.fence == int(first[1]) + 1
        *_, expiry, granted = await lease_events(client, "cuda:0")
        assert (expiry.kind, expiry.fence, granted.kind, granted.owner) == ("expire", int(first[1]), "grant", "next")
        assert expiry.held_ms >= ttl_ms, "held until its TTL ran out, at least"
    finally:
        holder.kill()


async def test_a_killed_waiter_is_skipped(redis_server: RedisServer, client: aioredis.Redis) -> None:
    holder = GpuLease(client, "holder", FAST)
    grant = await holder.acquire("cuda:0")
    doomed = subprocess.Popen([sys.executable, str(WORKER), "wait", redis_server.url, "cuda:0"],
                              stdout=subprocess.PIPE, text=True)
    assert doomed.stdout is not None and doomed.stdout.readline().strip() == "queued"
    survivor = asyncio.create_task(GpuLease(client, "survivor", FAST).acquire("cuda:0", timeout=10))
    await asyncio.sleep(0.1)
    assert (await device_status(client, "cuda:0")).queue == ["doomed-waiter", "survivor"]
    doomed.kill()
    doomed.wait()
    await holder.release(grant)
    got = await survivor
    assert got.fence == grant.fence + 1
    assert (await device_status(client, "cuda:0")).stats.get("skipped") == 1
    assert await client.hlen(f"{device_prefix(FAST.namespace, 'cuda:0')}:arrived") == 0, "no arrival left behind"


async def test_redis_down_is_unavailable_and_recovers(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    lease = GpuLease(client, "a", FAST)
    redis_server.stop()
    with pytest.raises(LeaseUnavailable, match="Redis unreachable"):
        await lease.acquire("cuda:0", timeout=1)
    redis_server.start()
    grant = await lease.acquire("cuda:0", timeout=5)
    assert await lease.release(grant)
    await client.aclose()


async def test_leaving_a_hold_as_a_renewal_lands_stops_the_heartbeat(client: aioredis.Redis) -> None:
    """hold() stops its heartbeat on exit. A stop that arrives as a renewal completes must still
    stop it: a heartbeat that beats on keeps hold() from returning, and the lease from being released."""
    lease = GpuLease(client, "busy", LeaseSettings(ttl_ms=200, heartbeat_ms=1))  # renewals back to back
    rng = random.Random(0)
    for turn in range(300):
        start = time.monotonic()
        async with asyncio.timeout(5):
            async with lease.hold("cuda:0"):
                await asyncio.sleep(rng.uniform(0, 0.003))
        assert time.monotonic() - start < 2, f"hold {turn} took {time.monotonic() - start:.1f} s to end"
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("lease-heartbeat")], \
            f"a heartbeat outlived hold {turn}"
    assert (await device_status(client, "cuda:0")).holder is None


async def test_status_lists_devices(client: aioredis.Redis) -> None:
    lease = GpuLease(client, "encoder", FAST)
    async with lease.hold("cuda:1"):
        assert await known_devices(client) == ["cuda:1"]
        table = format_status([await device_status(client, "cuda:1")])
        assert "cuda:1" in table and "encoder" in table


async def test_events_record_who_held_the_device_when_and_how_long_each_waited(client: aioredis.Redis) -> None:
    first, second = GpuLease(client, "encoder", FAST), GpuLease(client, "rollout", FAST)
    held = await first.acquire("cpu:0")
    waiting = asyncio.create_task(second.acquire("cpu:0"))
    await asyncio.sleep(0.3)
    await first.release(held)
    await second.release(await waiting)
    events = await lease_events(client, "cpu:0")
    assert [(e.kind, e.owner) for e in events] == [("grant", "encoder"), ("release", "encoder"),
                                                  ("grant", "rollout"), ("release", "rollout")]
    assert events[0].fence == events[1].fence == held.fence and events[2].fence == events[3].fence == held.fence + 1
    assert events[1].held_ms >= 300 and events[2].waited_ms >= 250 and events[0].waited_ms < 100
    assert [e.queue for e in events] == [0, 1, 0, 0]
    assert all(a.at_ms <= b.at_ms for a, b in zip(events, events[1:], strict=False))
    assert await lease_events(client, "cpu:0", since_ms=events[2].at_ms) == events[2:]
    assert await client.hlen(f"{device_prefix(FAST.namespace, 'cpu:0')}:arrived") == 0


async def test_a_server_declared_clean_grants_a_new_lease_on_its_first_ask(client: aioredis.Redis) -> None:
    # The fixture's Redis is younger than a TTL, so a lease that has not read the clean marker yet is
    # told "recovering"; reading the marker and asking again at once must grant it, not a poll later.
    slow_poll = LeaseSettings(ttl_ms=1000, waiter_ttl_ms=8000, poll_ms=3000)
    lease = GpuLease(client, "fresh", slow_poll)
    grant = await lease.acquire("cpu:0", timeout=20)
    await lease.release(grant)
    granted = (await lease_events(client, "cpu:0"))[0]
    assert granted.kind == "grant" and granted.waited_ms < 1000, f"waited a poll: {granted}"


async def test_the_event_stream_stays_at_its_cap(client: aioredis.Redis) -> None:
    lease = GpuLease(client, "trainer", LeaseSettings(ttl_ms=1000, waiter_ttl_ms=600, poll_ms=50, events_max=5))
    fences = []
    for _ in range(10):
        grant = await lease.acquire("cpu:0")
        fences.append(grant.fence)
        await lease.release(grant)
    assert await client.xlen(f"{device_prefix(FAST.namespace, 'cpu:0')}:events") == 5
    events = await lease_events(client, "cpu:0")
    assert [e.kind for e in events] == ["release", "grant", "release", "grant", "release"]
    assert [e.fence for e in events] == [fences[7], fences[8], fences[8], fences[9], fences[9]]


def test_settings_check_their_invariants() -> None:
    with pytest.raises(ValueError, match="events_max"):
        LeaseSettings(events_max=0)
    with pytest.raises(ValueError, match="waiter_ttl_ms"):
        LeaseSettings(waiter_ttl_ms=100, poll_ms=100)
    with pytest.raises(ValueError, match="heartbeat_ms"):
        LeaseSettings(ttl_ms=1000, heartbeat_ms=1000)


async def test_a_holder_reclaims_its_lease_after_a_redis_restart(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    lease = GpuLease(client, "holder", FAST)
    async with lease.hold("cuda:0") as grant:
        await asyncio.to_thread(redis_server.stop)  # without persistence: every key is gone
        await asyncio.to_thread(redis_server.start)
        other = GpuLease(aioredis.Redis.from_url(redis_server.url), "other", FAST)  # no stale pooled connection
        waiter = asyncio.create_task(other.acquire("cuda:0", timeout=10))
        await asyncio.sleep(1.5)  # 1.5 TTLs: only a reclaimed hold can still be ours
        assert lease.still_held(grant) and not waiter.done(), "nobody else is granted while the holder works"
        status = await device_status(client, "cuda:0")
        assert status.holder == "holder" and status.fence == grant.fence and status.stats["reclaims"] == 1
    later = await waiter
    assert later.fence > grant.fence, "fences keep growing across the restart"
    await client.aclose()
    await other.client.aclose()


async def test_after_a_redis_restart_a_silent_holder_stops_before_anyone_else_is_granted(
        redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    lease = GpuLease(client, "paused", FAST)
    silent = await lease.acquire("cuda:0")  # no heartbeat: a holder cut off from Redis
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start)
    other = GpuLease(aioredis.Redis.from_url(redis_server.url), "other", FAST)
    restarted = time.monotonic()
    grant = await other.acquire("cuda:0", timeout=10)
    assert time.monotonic() - restarted >= FAST.ttl_ms / 1000, "a fresh Redis grants nothing for one TTL"
    assert not lease.still_held(silent), "the old holder's own deadline passed before the new grant"
    assert not await lease.renew(silent) and silent.lost.is_set()
    assert grant.fence > silent.fence
    await client.aclose()
    await other.client.aclose()


@pytest.mark.parametrize("appendonly", [False, True], ids=["no-persistence", "appendonly"])
def test_a_redis_restart_under_contention_never_yields_two_holders(tmp_path: Path, appendonly: bool) -> None:
    server = RedisServer(tmp_path, appendonly=appendonly)
    server.start()
    server.declare_clean()
    out = tmp_path / "intervals.txt"
    procs = [subprocess.Popen([sys.executable, str(WORKER), "churn", server.url, "cuda:0", "9", str(out)])
             for _ in range(4)]
    try:
        time.sleep(3.0)  # the workers start (imports) and take turns
        server.stop()
        down = time.monotonic()
        time.sleep(0.2)  # shorter than most holds: holders work on across the restart
        restarting = time.monotonic()  # the new server's uptime counts from after this
        server.start()
        up = time.monotonic()
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            p.kill()
        server.stop()
    rows = sorted((float(s), float(e), int(f), int(lost)) for f, s, e, lost in
                  (line.split() for line in out.read_text().splitlines()))
    assert any(s < down for s, *_ in rows) and any(s > up for s, *_ in rows), "turns on both sides of the restart"
    after = [s for s, *_ in rows if s > down]
    assert min(after) >= restarting + FAST.ttl_ms / 1000, "no new grant within the quiet period after the restart"
    for (_, e1, f1, _), (s2, _, f2, _) in zip(rows, rows[1:], strict=False):
        assert s2 >= e1, f"grant {f2} started at {s2:.3f} while grant {f1} still worked (until {e1:.3f})"
        assert f2 > f1, f"fence {f2} granted after fence {f1}"
