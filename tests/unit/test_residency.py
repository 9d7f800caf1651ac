"""Batches under the GPU lease: models take turns on one device and leave it between turns."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis.asyncio as aioredis

from speechrl.services.batching import DynamicBatcher
from speechrl.services.lease import GpuLease, LeaseLost, LeaseSettings, LeaseUnavailable
from speechrl.services.residency import DeviceGuard
from tests.support.servers import RedisServer


class Model:
    """A model that records where it is, and who else was on the device while it computed."""

    on_device: set[str] = set()
    lock = threading.Lock()

    def __init__(self, name: str):
        self.name = name
        self.moves: list[str] = []
        self.overlaps = 0

    def load_to_device(self) -> None:
        self.moves.append("load")
        with self.lock:
            self.on_device.add(self.name)

    def offload(self, mode: str) -> None:
        self.moves.append(mode)
        with self.lock:
            self.on_device.discard(self.name)

    def compute(self, items: list[int]) -> list[int]:
        with self.lock:
            if self.on_device - {self.name}:
                self.overlaps += 1
        threading.Event().wait(0.01)
        return [i + 1 for i in items]


async def test_two_services_alternate_and_offload_between_turns(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    models = [Model("encoder"), Model("scorer")]
    batchers = []
    for model in models:
        guard = DeviceGuard(model, lease=GpuLease(client, model.name, LeaseSettings()), device="cpu:0", policy="offload")
        batchers.append(DynamicBatcher(model.compute, max_batch_size=4, max_wait_ms=1, name=model.name, guard=guard))
    results = await asyncio.gather(*(b.submit([i]) for i in range(20) for b in batchers))
    assert all(r == [i + 1] for r, i in zip(results, [i for i in range(20) for _ in batchers], strict=True))
    for model, batcher in zip(models, batchers, strict=True):
        assert model.overlaps == 0, f"{model.name} computed while another model was on the device"
        assert model.moves[0] == "load" and model.moves.count("load") == model.moves.count("offload")
        assert batcher.guard is not None and batcher.guard.residency == "offloaded"
        batcher.close()
    await client.aclose()


async def test_keep_policy_loads_once(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    model = Model("keeper")
    guard = DeviceGuard(model, lease=GpuLease(client, "keeper"), device="cpu:0", policy="keep")
    batcher = DynamicBatcher(model.compute, max_batch_size=2, max_wait_ms=1, name="keeper", guard=guard)
    await batcher.submit([1, 2, 3, 4, 5])
    assert model.moves == ["load"] and guard.residency == "resident"
    batcher.close()
    await client.aclose()


async def test_redis_down_fails_the_batch_with_a_lease_error(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    model = Model("orphan")
    # A restarted Redis grants nothing for one lease TTL (lease.py: no two holders): a short TTL keeps it brief.
    guard = DeviceGuard(model, lease=GpuLease(client, "orphan", LeaseSettings(ttl_ms=1000)), device="cpu:0",
                        policy="offload", wait_timeout_s=5)
    batcher = DynamicBatcher(model.compute, max_batch_size=2, max_wait_ms=1, name="orphan", guard=guard)
    redis_server.stop()
    with pytest.raises(LeaseUnavailable):
        await batcher.submit([1])
    redis_server.start()
    assert await batcher.submit([1]) == [2], "the batcher recovers when Redis returns"
    batcher.close()
    await client.aclose()


async def test_a_batch_that_outlives_its_lease_fails_with_lease_lost(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    started, finish = threading.Event(), threading.Event()

    class Slow(Model):
        def compute(self, items: list[int]) -> list[int]:
            started.set()
            finish.wait(10)
            return [i + 1 for i in items]

    model = Slow("slow")
    guard = DeviceGuard(model, lease=GpuLease(client, "slow", LeaseSettings(ttl_ms=300)), device="cpu:0", policy="keep",
                        wait_timeout_s=5)
    batcher = DynamicBatcher(model.compute, max_batch_size=2, max_wait_ms=1, name="slow", guard=guard)
    batch = asyncio.create_task(batcher.submit([1]))
    await asyncio.to_thread(started.wait, 10)
    redis_server.stop()  # no heartbeat gets through: past its deadline the holder must count the lease as lost
    await asyncio.sleep(0.5)
    finish.set()
    with pytest.raises(LeaseLost, match="lapsed during the batch"):
        await batch
    redis_server.start()
    assert await batcher.submit([1]) == [2], "the next batch runs once Redis is back (after its quiet period)"
    batcher.close()
    await client.aclose()


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="keep"):
        DeviceGuard(Model("x"), lease=None, device="cpu", policy="swap")
