"""The trainer's turn on its device (jobs/turn.py, jobs/driver.py) with a real lease on a private Redis:
a lease that lapses mid-update leaves the weights and the optimizer as they were, a job on cuda:0 takes
that device's lease without any setting, and a checkpoint of the same step keeps the newest fence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from torch import nn

from speechrl.services.lease import LeaseLost
from speechrl.services.ledger import read_ledger
from speechrl.trainer.jobs.checkpoint import StaleCheckpoint, TrainState, save_checkpoint
from speechrl.trainer.jobs.driver import lease_device_of, residency_of, trainer_guard
from speechrl.trainer.jobs.kind import JobConfig
from speechrl.trainer.jobs.turn import TrainerResidency, UpdateTurn
from tests.support.servers import RedisServer


def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def slow_update(model: nn.Module, optimizer: torch.optim.Optimizer, seconds: float) -> Callable[..., dict[str, float]]:
    """Two optimizer steps, the second after a pause: the lease's TTL can run out in between. The first
    goes at once, so that it lands inside the TTL however loaded the machine is."""

    def update(batch: Any, check: Callable[[], None] | None) -> dict[str, float]:
        for step in range(2):
            loss = model(torch.ones(3, 4)).pow(2).sum()
            loss.backward()
            time.sleep(seconds if step else 0.0)
            if check is not None:
                check()
            optimizer.step()
            optimizer.zero_grad()
        return {"loss": float(loss.detach())}

    return update


def job(redis_url: str, **values: Any) -> JobConfig:
    return JobConfig(policy="p", data="d", redis_url=redis_url, **values)


def stall_heartbeat(guard: Any) -> None:
    """The holder stops renewing (a long GC pause, a partition): its lease runs out after its TTL."""

    async def stalled(grant: Any, stop: asyncio.Event) -> None:
        await stop.wait()

    guard.lease._heartbeat = stalled


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], {
        k: v.clone() for s in optimizer.state.values() for k, v in s.items()}


def test_a_lease_that_lapses_mid_update_leaves_no_trace(redis_server: RedisServer) -> None:
    model, optimizer = tiny()
    config = job(redis_server.url, device="cpu", lease_device="cpu:0", residency="offload", lease_ttl_ms=400)
    guard = trainer_guard(config, TrainerResidency([model], optimizer, "cpu"))
    turn = UpdateTurn(slow_update(model, optimizer, 0.0), guard, model, optimizer)

    async def good_then_lapsed() -> tuple[Any, Any]:  # one event loop, as in a job
        await turn.update(None)  # one good update: the optimizer has state to lose
        before = snapshot(model, optimizer)
        stall_heartbeat(guard)
        turn.update_fn = slow_update(model, optimizer, 0.6)  # the first step lands inside the TTL, the second not
        with pytest.raises(LeaseLost, match="lapsed during the update"):
            await turn.update(None)
        return before

    weights, state = asyncio.run(good_then_lapsed())
    after_weights, after_state = snapshot(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(weights, after_weights, strict=True))
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)


def test_without_the_rollback_a_lapsed_update_would_have_moved_the_weights(redis_server: RedisServer) -> None:
    # The check above can fail: the same lapse with no restore point (an update that cannot be undone)
    # keeps the first optimizer step, and the turn says so instead of pretending nothing happened.
    model, optimizer = tiny()
    config = job(redis_server.url, device="cpu", lease_device="cpu:0", lease_ttl_ms=400)
    guard = trainer_guard(config, TrainerResidency([model], optimizer, "cpu"))
    stall_heartbeat(guard)
    before = [p.detach().clone() for p in model.parameters()]
    turn = UpdateTurn(slow_update(model, optimizer, 0.6), guard)  # no model / optimizer: nothing to restore
    with pytest.raises(RuntimeError, match="cannot be undone"):
        asyncio.run(turn.update(None))
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_job_on_cuda_takes_that_devices_lease_without_any_setting(redis_server: RedisServer) -> None:
    config = job(redis_server.url, device="cuda:0")  # no lease_device, no residency: the defaults
    assert (lease_device_of(config), residency_of(config)) == ("cuda:0", "offload")
    assert lease_device_of(job(redis_server.url, device="cuda:0", lease_device="none")) == ""
    assert lease_device_of(job(redis_server.url, device="cuda:0", lease_device="")) == "cuda:0"  # old job files
    model, optimizer = tiny()  # CPU tensors under a cuda:0 lease: the name is all the lease sees
    guard = trainer_guard(config, TrainerResidency([model], optimizer, "cpu"))
    assert guard.lease is not None and guard.priority == "high" and guard.device == "cuda:0"
    turn = UpdateTurn(slow_update(model, optimizer, 0.0), guard, model, optimizer)
    _, fence = asyncio.run(turn.update(None))
    assert fence > 0
    client = redis.Redis.from_url(redis_server.url)
    stats = {k.decode(): int(v) for k, v in client.hgetall("speechrl:lease:{cuda:0}:stats").items()}
    assert stats.get("grants", 0) >= 1, stats
    [entry] = read_ledger(client, "cuda:0")  # and it said what it held, and that it left
    assert entry.owner.startswith("trainer-") and entry.residency == "offloaded" and entry.weight_bytes == 0


def test_the_newest_fence_wins_a_checkpoint_race_on_the_same_step(tmp_path: Path) -> None:
    model, optimizer = tiny()

    def save(fence: int, tag: str) -> Path:
        return save_checkpoint(tmp_path, TrainState(step=3, fence=fence),
                               lambda folder: (folder / "tag").write_text(tag), optimizer)

    final = save(9, "newer")
    with pytest.raises(StaleCheckpoint, match="fence 9, newer than this writer's 7"):
        save(7, "stale")
    assert (final / "tag").read_text() == "newer" and TrainState.load(final).fence == 9
    assert not list(tmp_path.glob("checkpoints/.partial-*"))
    save(11, "newest")
    assert (final / "tag").read_text() == "newest"

