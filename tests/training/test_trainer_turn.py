"""The trainer takes its turn on the device, through real services and a real Redis: with residency
offload a poller of the device-memory ledger never sees two processes resident at once (with keep it
does), and an update whose lease lapses is undone and retried, and twice ends the job with nothing pushed."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from speechrl.client import AudioEncoderClient, RolloutClient
from speechrl.services.lease import GpuLease
from speechrl.services.lease import status as lease_status
from speechrl.services.ledger import read_ledger
from speechrl.trainer.jobs import driver
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.jobs.registry import run_job
from tests.support.servers import RedisServer
from tests.support.training import Recorder, asr_job, asr_services, asr_warm_start

DEVICE = "cpu:0"  # every process takes this device's lease, as they would cuda:0's on a GPU box


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return asr_warm_start(tmp_path_factory.mktemp("asr-turn"))


class LedgerPoller:
    """Reads the device's ledger every few milliseconds while a job runs: the most processes it ever saw
    resident at once, and who was ever resident."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url)
        self.most_resident = 0
        self.owners_resident: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.is_set():
            resident = [e.owner for e in read_ledger(self.client, DEVICE) if e.resident]
            self.most_resident = max(self.most_resident, len(resident))
            self.owners_resident.update(resident)
            time.sleep(0.002)

    def __enter__(self) -> LedgerPoller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("residency", ["offload", "keep"])
def test_the_ledger_shows_one_resident_process_at_a_time_only_when_they_offload(
        warm: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer, residency: str) -> None:
    settings = {"lease_device": DEVICE, "residency": residency, "redis_url": redis_server.url}
    with asr_services(*warm, **settings) as stack, LedgerPoller(redis_server.url) as poller:
        config = replace(asr_job(stack, tmp_path / "run", 2, redis_server.url), residency=residency)
        run_job("asr-grpo", config, Recorder())
        with AudioEncoderClient(stack.encoder) as encoder:
            [memory] = encoder.get_service_status().device_memory
    kinds = {owner.split("-")[0].split(":")[0] for owner in poller.owners_resident}
    assert {"encoder", "rollout", "trainer"} <= kinds, poller.owners_resident  # each took its turns
    if residency == "offload":
        assert poller.most_resident == 1
        assert memory.device == DEVICE and memory.residency == "offloaded" and memory.weight_bytes == 0
        entries = read_ledger(redis.Redis.from_url(redis_server.url), DEVICE)
        trainer = next(e for e in entries if e.owner.startswith("trainer-"))
        assert trainer.residency == "offloaded"
        shown = io.StringIO()
        with redirect_stdout(shown):
            lease_status.main(["status", "--redis-url", redis_server.url])
        assert trainer.owner in shown.getvalue() and "offloaded" in shown.getvalue()
    else:
        assert poller.most_resident >= 2  # the check can fail: kept weights share the device
        assert memory.residency == "resident" and memory.weight_bytes > 0


def stall_the_trainers_heartbeat(monkeypatch: pytest.MonkeyPatch, attempts: int) -> None:
    """The trainer's first `attempts` updates stop renewing their lease (a long pause) and run past its
    TTL; the services' leases (same class, same process) beat as usual."""
    beat = GpuLease._heartbeat
    stalled = {"left": attempts}

    async def heartbeat(self: GpuLease, grant: Any, stop: asyncio.Event) -> None:
        if self.owner.startswith("trainer-") and stalled["left"] > 0:
            stalled["left"] -= 1
            await stop.wait()
            return
        await beat(self, grant, stop)

    update = driver.grpo_update

    def slow_update(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)  # longer than the TTL below: the optimizer step finds the lease gone
        return update(*args, **kwargs)

    monkeypatch.setattr(GpuLease, "_heartbeat", heartbeat)
    monkeypatch.setattr(driver, "grpo_update", slow_update)


def test_a_lost_lease_is_retried_from_the_same_rollouts(warm: tuple[Path, Path], tmp_path: Path,
                                                       redis_server: RedisServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stall_the_trainers_heartbeat(monkeypatch, attempts=1)
    with asr_services(*warm) as stack:
        config = replace(asr_job(stack, tmp_path / "run", 1, redis_server.url), lease_device=DEVICE, lease_ttl_ms=400)
        recorder = Recorder()
        run_job("asr-grpo", config, recorder)
    [(step, metrics)] = recorder.steps
    assert step == 1 and metrics["lease_lost"] == 1.0 and metrics["fence"] > 0


def test_a_second_loss_in_a_row_ends_the_job_with_nothing_pushed(warm: tuple[Path, Path], tmp_path: Path,
                                                                redis_server: RedisServer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stall_the_trainers_heartbeat(monkeypatch, attempts=2)
    with asr_services(*warm) as stack:
        with RolloutClient(stack.rollout) as rollout:
            before = rollout.get_service_status().policy_version
        out = tmp_path / "run"
        config = replace(asr_job(stack, out, 2, redis_server.url), lease_device=DEVICE, lease_ttl_ms=400)
        with pytest.raises(driver.LeaseLostTwice, match="lost its GPU lease twice in a row"):
            run_job("asr-grpo", config, Recorder())
        with RolloutClient(stack.rollout) as rollout:
            assert rollout.get_service_status().policy_version == before + 1  # the first push only: no step's
    assert latest_checkpoint(out) is None
    assert (out / "metrics.jsonl").read_text() == ""

