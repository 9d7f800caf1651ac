"""Faults under load: a scorer replica killed with SIGKILL mid-load costs its in-flight calls a
retry on the other replica, never a lost request."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time

import pytest

from speechrl.client import AsyncRuleRewardsClient, RetryPolicy, ServiceError
from speechrl.services.healthcheck import grpc_status
from speechrl.services.ports import free_port

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
