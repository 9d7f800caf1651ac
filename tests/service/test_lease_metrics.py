"""The lease's Prometheus metrics on a real Redis: the wait and hold histograms by device and owner
(the owner without its process id), grants, and a loss counted from a series that existed at 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from speechrl.services.lease import GpuLease, LeaseSettings
from speechrl.services.lease.lease import owner_label
from tests.support.servers import RedisServer

FAST = LeaseSettings(ttl_ms=1000, waiter_ttl_ms=600, poll_ms=50)


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_owner_label_drops_the_process_id() -> None:
    assert owner_label("intelligibility-4711") == "intelligibility"
    assert owner_label("token2wav-score-4711") == "token2wav-score"
    assert owner_label("rollout:4711") == "rollout"
    assert owner_label("trainer") == "trainer"


async def test_wait_and_hold_are_observed_by_device_and_owner(client: aioredis.Redis) -> None:
    device = "metrics:0"
    holder, waiter = GpuLease(client, "speaker-101", FAST), GpuLease(client, "trainer-202", FAST)
    before = sample("speechrl_lease_wait_seconds_count", device=device, owner="trainer")
    grant = await holder.acquire(device)
    waiting = asyncio.create_task(waiter.acquire(device, priority="high"))
    await asyncio.sleep(0.3)
    await holder.release(grant)
    await waiter.release(await waiting)

    assert sample("speechrl_lease_wait_seconds_count", device=device, owner="trainer") == before + 1
    assert sample("speechrl_lease_wait_seconds_sum", device=device, owner="trainer") >= 0.25
    # Waits of up to 10 minutes land in finite buckets, so the 30 s alert bound can be read off.
    assert sample("speechrl_lease_wait_seconds_bucket", device=device, owner="trainer", le="30.0") == before + 1
    assert sample("speechrl_lease_wait_seconds_bucket", device=device, owner="trainer", le="0.1") == 0
    assert sample("speechrl_lease_hold_seconds_sum", device=device, owner="speaker") >= 0.25
    assert sample("speechrl_lease_events_total", device=device, owner="speaker", event="granted") == 1
    assert sample("speechrl_lease_events_total", device=device, owner="trainer", event="released") == 1


async def test_a_lost_lease_is_counted_from_a_series_at_zero(client: aioredis.Redis) -> None:
    device = "metrics:1"
    now = [0.0]
    lease = GpuLease(client, "rules-303", FAST, clock=lambda: now[0])
    grant = await lease.acquire(device)
    # The series exists from the grant, so increase() over it sees the first loss.
    assert REGISTRY.get_sample_value("speechrl_lease_events_total",
                                     {"device": device, "owner": "rules", "event": "lost"}) == 0
    now[0] = 5.0  # paused past our own deadline: the renewal refuses and marks the lease lost
    assert not await lease.renew(grant) and grant.lost.is_set()
    assert sample("speechrl_lease_events_total", device=device, owner="rules", event="lost") == 1
    await lease.release(grant)
