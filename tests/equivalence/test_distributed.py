"""The GRPO update data-parallel (tier 4): two CPU processes under torchrun (gloo, FSDP2) reach the
loss, metrics and weights of one process on the same batch; the batch sharding keeps groups whole
and passes every sample the advantage it has in the full batch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import yaml
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from speechrl.client import RolloutClient
from speechrl.services.ports import free_port
from speechrl.trainer.core.advantages import group_advantages
from speechrl.trainer.core.distributed import check_shardable, shard_batch, shard_model, shard_rows
from tests.support.distributed_worker import DRIVER, SCENARIOS, build, make_batch, run_single, settings
from tests.support.servers import RedisServer
from tests.support.training import Stack, asr_job, asr_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from asr_stack(tmp_path_factory.mktemp("asr-grpo"))

WORKER = Path(__file__).parents[1] / "support" / "distributed_worker.py"
Expected = tuple[list[dict[str, float]], dict[str, torch.Tensor], dict[str, Any]]


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *options]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Expected]]]:
    """Every scenario under torchrun with 2 processes, and meanwhile in this process: (their outputs, ours)."""
    out = tmp_path_factory.mktemp("two-ranks")
    command = [*torchrun(), str(WORKER), str(out)]
    with subprocess.Popen(command, cwd=WORKER.parents[2], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        try:
            expected = {name: run_single(s) for name, s in [*SCENARIOS.items(), ("driver", DRIVER)]}
            output, _ = process.communicate(timeout=240)
        finally:
            process.kill()
    assert process.returncode == 0, output[-4000:]
    yield out, expected


@pytest.mark.parametrize("name", [*SCENARIOS, "driver"])
def test_two_ranks_make_the_update_of_one_process(two_ranks: tuple[Path, dict[str, Expected]], name: str) -> None:
    out, expected = two_ranks
    metrics, state, optimizer_state = expected[name]
    got = torch.load(out / f"{name}.pt", weights_only=True)
    assert len(got["metrics"]) == len(metrics)
    for one, two in zip(metrics, got["metrics"], strict=True):
        assert two.keys() == one.keys()
        for key, value in one.items():  # loss, kl, clip fraction, grad norm, rewards ... of every update
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    initial = build(DRIVER if name == "driver" else SCENARIOS[name]).state_dict()
    assert got["state"].keys() == state.keys()
    moved = [key for key, value in state.items() if not torch.equal(value, initial[key])]
    assert moved, "the update moved nothing"
    for key in moved:
        torch.testing.assert_close(got["state"][key], state[key], atol=1e-5, rtol=1e-5, msg=key)
    if name == "driver":  # the gathered optimizer state is one process's optimizer.state_dict()
        for ours, theirs in zip(optimizer_state["param_groups"], got["optimizer"]["param_groups"], strict=True):
            assert {k: list(v) if isinstance(v, tuple) else v for k, v in ours.items()} == theirs  # betas: a list
        for index, values in optimizer_state["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got["optimizer"]["state"][index][key], values[key], atol=1e-6, rtol=1e-4)


def test_shards_keep_groups_whole_and_split_every_optimizer_step() -> None:
    samples, group, world = 24, 3, 2
    for step in (24, 12, 6):
        shards = [shard_rows(samples, group, step, world, rank) for rank in range(world)]
        assert sorted(torch.cat(shards).tolist()) == list(range(samples))  # every sample once
        for rows in shards:
            groups = rows.view(-1, group)  # [n / G, G]
            assert (groups[:, 0] % group == 0).all() and (groups - groups[:, :1] == torch.arange(group)).all()
            # the k-th local step is the rank's part of the k-th global one
            for k, local_step in enumerate(rows.view(-1, step // world)):
                assert ((local_step >= k * step) & (local_step < (k + 1) * step)).all()
    with pytest.raises(ValueError, match="whole groups of 3"):
        shard_rows(samples, group, step_size=8, world_size=2, rank=0)
    with pytest.raises(ValueError, match="do not split into optimizer steps"):
        shard_rows(samples, group, step_size=18, world_size=2, rank=0)
    with pytest.raises(ValueError, match="2 ranks x whole groups"):
        check_shardable(settings(batch_size=3), world_size=2)


def test_shards_take_the_full_batch_advantages_and_their_own_prompts() -> None:
    batch = make_batch(False, [1.0, 0.0, None, 0.7, 0.3, 0.9, 0.0, 1.0])
    config = settings(scale_rewards="batch", gradient_accumulation_steps=2)
    full, scored = group_advantages(batch.rewards, batch.group_size, "batch")  # [N], [N]
    for rank in range(2):
        shard, rows, local = shard_batch(batch, config, world_size=2, rank=rank)
        assert local.mini_batch_size * local.gradient_accumulation_steps == 2  # half of a global step of 4
        assert shard.rewards == [batch.rewards[i] for i in rows.tolist()]
        for i, row in enumerate(rows.tolist()):  # each sample keeps its own prompt
            assert torch.equal(shard.prompt_ids[i // shard.group_size], batch.prompt_ids[row // batch.group_size])
        # Whole groups: the group-wise advantages of a shard are the full batch's ...
        own, _ = group_advantages(shard.rewards, shard.group_size, "group")
        torch.testing.assert_close(own, group_advantages(batch.rewards, batch.group_size, "group")[0][rows])
        # ... but a batch-wide std is not a shard's; grpo_update_distributed passes full[rows] instead.
        own, _ = group_advantages(shard.rewards, shard.group_size, "batch")
        assert not torch.allclose(own, full[rows])


def test_tied_embeddings_are_refused() -> None:
    tied = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="ties its input and output embeddings"):
        shard_model(tied, torch.device("cpu"))


@pytest.mark.slow
def test_speechrl_train_under_torchrun(stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    """`torchrun --nproc-per-node 2 -m speechrl.trainer.jobs.cli train job.yaml` through the real services:
    rank 0 alone shows the bar and writes files, each rank takes its own device's lease."""
    out = tmp_path / "run"
    config = asdict(asr_job(stack, out, 2, redis_server.url))  # lease_device cpu:0: rank r takes cpu:r
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"kind": "asr-grpo", **config}))
    logs = tmp_path / "logs"
    command = torchrun("--redirects", "3", "--log-dir", str(logs), "-m", "speechrl.trainer.jobs.cli", "train", "job.yaml")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    rank_logs = {rank: {stream: next(logs.rglob(f"attempt_0/{rank}/{stream}.log")).read_text()
                        for stream in ("stdout", "stderr")} for rank in (0, 1)}
    assert done.returncode == 0, done.stderr[-3000:] + rank_logs[0]["stderr"][-3000:] + rank_logs[1]["stderr"][-3000:]
    assert json.loads(rank_logs[0]["stdout"])["steps"] == 2 and rank_logs[1]["stdout"] == ""
    assert "2/2" in rank_logs[0]["stderr"] and "/2 [" not in rank_logs[1]["stderr"]  # the tqdm bar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "logs", "run"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with RolloutClient(stack.rollout) as rollout:
        assert rollout.get_service_status().policy_version == 3  # initial sync, then one per step
    initial = load_file(str(stack.policy / "model.safetensors"))
    trained = load_file(str(out / "checkpoints" / "step-000002" / "policy" / "model.safetensors"))
    assert sum(not torch.equal(initial[k], trained[k]) for k in initial) > len(initial) // 2
    fences = redis.Redis.from_url(redis_server.url).keys("*cpu:[01]}:fence")
    assert len(fences) == 2, fences  # cpu:0 (rank 0) and cpu:1 (rank 1) were both leased
