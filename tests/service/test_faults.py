"""Faults under load: a scorer replica killed with SIGKILL mid-load costs its in-flight calls a
retry on the other replica, never a lost request; SIGTERM mid-batch drains it and frees the lease."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from speechrl.client import AsyncRuleRewardsClient, RetryPolicy, ServiceError
from speechrl.services.healthcheck import grpc_status
from speechrl.services.lease import GpuLease, LeaseSettings
from speechrl.services.ports import free_port
from speechrl.v1 import common_pb2, intelligibility_pb2_grpc
from speechrl.v1 import intelligibility_pb2 as ipb
from tests.support.servers import RedisServer, Speech

CLIENTS = 16


def start_replica(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "speechrl.services.cli", "serve", "rules", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while grpc_status(f"127.0.0.1:{port}") != "SERVING":
        assert proc.poll() is None and time.monotonic() < deadline, "rules replica did not start"
        time.sleep(0.1)
    return proc


async def drive(endpoints: list[str], victim: subprocess.Popen[bytes], seconds: float) -> tuple[int, list[ServiceError]]:
    """CLIENTS loops of one-item calls for `seconds`; the victim is SIGKILLed a third of the way in."""
    ok, failures = 0, []
    stop_at = time.monotonic() + seconds
    async with AsyncRuleRewardsClient(endpoints, timeout_s=10,
                                      retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.05)) as client:

        async def loop() -> None:
            nonlocal ok
            while time.monotonic() < stop_at:
                try:
                    results = await client.score(["the cat sat"], ["the cat sat"])
                except ServiceError as exc:
                    failures.append(exc)
                    continue
                assert results[0].score is not None
                ok += 1

        async def kill() -> None:
            await asyncio.sleep(seconds / 3)
            victim.send_signal(signal.SIGKILL)

        await asyncio.gather(kill(), *(loop() for _ in range(CLIENTS)))
    return ok, failures


def test_a_replica_killed_mid_load_loses_no_retried_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="speechrl.client")
    ports = [free_port(), free_port()]
    replicas = [start_replica(port) for port in ports]
    try:
        ok, failures = asyncio.run(drive([f"127.0.0.1:{p}" for p in ports], replicas[0], seconds=6.0))
    finally:
        for proc in replicas:
            proc.kill()
            proc.wait(timeout=10)
    assert replicas[0].returncode == -signal.SIGKILL
    assert failures == [], failures[:3]
    assert ok > CLIENTS * 10
    # The kill mattered: calls to the dead replica failed UNAVAILABLE and were retried on the live one.
    assert any("UNAVAILABLE" in r.getMessage() and "retry" in r.getMessage() for r in caplog.records)


SENTENCES = ["The weather today is sunny with a light breeze from the west.",
             "Please call Stella and ask her to bring these things from the store.",
             "Reinforcement learning improves speech recognition models."]


def test_sigterm_mid_batch_finishes_it_refuses_new_calls_and_releases_the_lease(
        speech: Speech, redis_server: RedisServer) -> None:
    port, grace = free_port(), 30.0
    proc = subprocess.Popen([sys.executable, "-m", "speechrl.services.cli", "serve", "intelligibility",
                             "--port", str(port), "--lease-device", "cpu:0", "--residency", "offload",
                             "--redis-url", redis_server.url, "--grace-seconds", str(grace), "--threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address, r = f"127.0.0.1:{port}", redis.Redis.from_url(redis_server.url)
    holder_key = "speechrl:lease:{cpu:0}:holder"
    try:
        deadline = time.monotonic() + 120
        while grpc_status(address) != "SERVING":
            assert proc.poll() is None and time.monotonic() < deadline, "intelligibility server did not start"
            time.sleep(0.2)
        items = [ipb.IntelligibilityItem(audio=common_pb2.Audio(encoded=speech.wav(t)), reference_text=t)
                 for t in SENTENCES * 2]
        with grpc.insecure_channel(address) as channel, ThreadPoolExecutor(1) as pool:
            stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(channel)
            in_flight = pool.submit(stub.ScoreIntelligibility, ipb.ScoreIntelligibilityRequest(items=items), timeout=120)
            while r.get(holder_key) is None:  # the batch holds the lease: it is running now
                assert not in_flight.done() and time.monotonic() < deadline, "the batch never took the lease"
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            while grpc_status(address) == "SERVING":
                assert time.monotonic() - signalled < 5, "still SERVING after SIGTERM"
                time.sleep(0.02)
            assert not in_flight.done(), "the batch should still be running: make it longer"
            with pytest.raises(grpc.RpcError) as refused:
                stub.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(items=items[:1]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            results = in_flight.result(timeout=120).results
        assert [res.score.wer < 0.5 for res in results] == [True] * len(items), "in-flight calls get real results"
        assert proc.wait(timeout=grace) == 0
        assert time.monotonic() - signalled < grace
        assert r.get(holder_key) is None, "the lease was released, not left to its TTL"
        asked = time.monotonic()
        assert asyncio.run(_acquire_once(redis_server.url)) and time.monotonic() - asked < 1.0
    finally:
        proc.kill()
        proc.wait(timeout=10)
        r.close()


async def _acquire_once(url: str) -> bool:
    client = aioredis.Redis.from_url(url)
    try:
        lease = GpuLease(client, "next", LeaseSettings(ttl_ms=10_000))
        return await lease.release(await lease.acquire("cpu:0", timeout=5))
    finally:
        await client.aclose()


def test_an_item_whose_caller_gave_up_is_not_run(speech: Speech) -> None:
    from prometheus_client import REGISTRY

    from speechrl.services.intelligibility.server import SERVICE, IntelligibilityConfig, start
    from speechrl.v1 import common_pb2_grpc
    from tests.support.servers import serve_in_thread

    def expired() -> float:
        return REGISTRY.get_sample_value("speechrl_items_expired_total", {"batcher": SERVICE}) or 0.0

    # One item per batch: the second call's item waits behind the first call's four batches.
    config = IntelligibilityConfig(port=free_port(), max_batch_size=1, max_wait_ms=0, threads=1)
    items = [ipb.IntelligibilityItem(audio=common_pb2.Audio(encoded=speech.wav(t)), reference_text=t)
             for t in [*SENTENCES, *SENTENCES[:2]]]
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch, \
            ThreadPoolExecutor(1) as pool:
        stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(ch)
        status = common_pb2_grpc.ServiceStatusStub(ch)
        stub.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(items=items[:1]), timeout=60)  # warm
        before, processed = expired(), status.GetServiceStatus(common_pb2.GetServiceStatusRequest()).items_processed
        slow = pool.submit(stub.ScoreIntelligibility, ipb.ScoreIntelligibilityRequest(items=items[:4]), timeout=120)
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as late:
            stub.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(items=items[4:]), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert all(r.score.wer < 0.5 for r in slow.result(timeout=120).results)
        deadline = time.monotonic() + 10
        while expired() < before + 1:  # counted when the batcher reaches the item
            assert time.monotonic() < deadline, "the expired item was never counted"
            time.sleep(0.05)
        after = status.GetServiceStatus(common_pb2.GetServiceStatusRequest()).items_processed
        assert after - processed == 4, "the late call's item was dropped, not run"
        assert stub.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(items=items[4:]), timeout=60).results[0].score
