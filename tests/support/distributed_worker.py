"""The data-parallel side of tests/test_distributed.py, one process per rank under torchrun (gloo, CPU):

    python -m torch.distributed.run --nproc-per-node 2 tests/support/distributed_worker.py OUT_DIR

Runs every SCENARIOS entry on a tiny random Qwen2 sharded with FSDP2 and writes rank 0's results
(per-update metrics, the full state dict after the updates) to OUT_DIR/<name>.pt. The test runs
the same scenarios in one process (`run_single`) and compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from speechrl.trainer.core import distributed
from speechrl.trainer.core.config import GRPOConfig
from speechrl.trainer.core.policy import apply_lora, make_optimizer, make_reference
from speechrl.trainer.core.step import RolloutBatch, grpo_update

VOCAB, HIDDEN, PROMPTS, GROUP = 100, 64, 4, 2


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


def make_batch(embeds: bool, rewards: list[float | None]) -> RolloutBatch:
    """4 prompts x 2 completions; prompts as ids, or as embeddings (an LLM-ASR's audio + instruction)."""
    generator = torch.Generator().manual_seed(1)
    samples = PROMPTS * GROUP
    prompt_mask = (torch.arange(5)[None] >= torch.tensor([2, 0, 1, 0])[:, None]).long()  # [P, 5] left-padded
    lengths = torch.tensor([4, 3, 2, 5, 1, 4, 3, 2])  # [N] completion lengths, right-padded
    completion_mask = (torch.arange(5)[None] < lengths[:, None]).long()  # [N, 5]
    completion_ids = torch.randint(3, VOCAB, (samples, 5), generator=generator)  # [N, 5]
    if embeds:
        prompt_embeds = torch.randn(PROMPTS, 5, HIDDEN, generator=generator) * 0.02  # [P, 5, H]
        return RolloutBatch(completion_ids, completion_mask, rewards, prompt_mask, prompt_embeds=prompt_embeds)
    prompt_ids = torch.randint(3, VOCAB, (PROMPTS, 5), generator=generator)  # [P, 5]
    return RolloutBatch(completion_ids, completion_mask, rewards, prompt_mask, prompt_ids=prompt_ids)


def sgd(model: torch.nn.Module, config: GRPOConfig) -> torch.optim.Optimizer:
    # SGD, not Adam: Adam's first step is ~lr * sign(g), which hides a wrongly scaled gradient.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


@dataclass(frozen=True)
class Scenario:
    config: GRPOConfig
    batch: RolloutBatch
    updates: int
    optimizer: Callable[[torch.nn.Module, GRPOConfig], torch.optim.Optimizer] = sgd
    lora: bool = False
    offload: bool = False  # FSDP2's CPU offload policy (the trainer's residency offload under torchrun)


def settings(**overrides: Any) -> GRPOConfig:
    return GRPOConfig(**{"batch_size": PROMPTS, "group_size": GROUP, "mini_batch_size": 2, "kl_beta": 0.1,
                         "learning_rate": 1e-3, **overrides})


SCENARIOS = {
    # embedding prompts, one optimizer step per update in two micro-batches per rank, gradient clipping
    "embeds": Scenario(settings(), make_batch(True, [1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0]), updates=2),
    # four optimizer steps per update (2 per pass, 2 passes, off-policy ratios clipped), an unscored
    # sample, batch-wide std, per-sequence aggregation, ids prompts
    "steps": Scenario(settings(gradient_accumulation_steps=2, num_iterations=2, clip_epsilon=0.02,
                               scale_rewards="batch", loss_aggregation="sequence_mean"),
                      make_batch(False, [1.0, 0.0, None, 0.7, 0.3, 0.9, 0.0, 1.0]), updates=1),
    # LoRA: the reference is the sharded policy with its adapters off
    "lora": Scenario(settings(lora=True, lora_r=4), make_batch(True, [1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0]),
                     updates=1, lora=True),
    # the shards, their gradients and the optimizer state in host memory, the step on the CPU
    "offload": Scenario(settings(), make_batch(True, [1.0, 0.0, 0.2, 0.9, 0.5, 0.5, 0.0, 1.0]), updates=2,
                        offload=True),
}
DRIVER = Scenario(settings(), make_batch(True, [0.0, 1.0, 0.5, 0.1, 1.0, 0.0, 0.3, 0.6]),
                  updates=3, optimizer=make_optimizer)  # through DataParallelUpdate / follow, AdamW


def build(scenario: Scenario) -> torch.nn.Module:
    model = tiny_model()
    return apply_lora(model, scenario.config) if scenario.lora else model


def run_single(scenario: Scenario) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict[str, Any]]:
    """One process: (metrics of each update, the weights after them, the optimizer state)."""
    model = build(scenario)
    reference, optimizer = make_reference(model), scenario.optimizer(model, scenario.config)
    metrics = [grpo_update(model, reference, optimizer, scenario.batch, scenario.config)
               for _ in range(scenario.updates)]
    return metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer.state_dict()


def run_sharded(scenario: Scenario, out: Path) -> None:
    model = build(scenario)
    reference = make_reference(model)
    policy = distributed.shard_model(model, torch.device("cpu"), scenario.offload)
    shard_reference = distributed.shard_reference(reference, policy, torch.device("cpu"), scenario.offload)
    optimizer = scenario.optimizer(policy, scenario.config)
    metrics = []
    for _ in range(scenario.updates):
        # every rank takes rank 0's batch, as in a job
        batch = distributed.broadcast_batch(scenario.batch if dist.get_rank() == 0 else None)
        metrics.append(distributed.grpo_update_distributed(policy, shard_reference, optimizer, batch,
                                                           scenario.config))
    state = distributed.full_state_dict(policy)
    if dist.get_rank() == 0:
        torch.save({"metrics": metrics, "state": state}, out)


def run_driver(scenario: Scenario, control: dist.ProcessGroup, out: Path) -> None:
    """Rank 0 drives DataParallelUpdate with an unsharded mirror; rank 1 follows, as in the driver (jobs/driver.py)."""
    model = tiny_model()
    sharded = distributed.ShardedUpdate(model, make_reference(model), scenario.config, torch.device("cpu"))
    if dist.get_rank() > 0:
        asyncio.run(distributed.follow(sharded, control, contextlib.nullcontext))
        return
    mirror = tiny_model(seed=5)  # other weights: the driver must send its own to every rank
    mirror.load_state_dict(tiny_model().state_dict())
    update = distributed.DataParallelUpdate(sharded, mirror, control)
    metrics = [update(scenario.batch) for _ in range(scenario.updates - 1)]
    optimizer_state = update.state_dict()  # what a checkpoint saves; loading it back must change nothing
    update.load_state_dict(optimizer_state)
    metrics.append(update(scenario.batch))
    optimizer_state = update.state_dict()
    update.close()
    torch.save({"metrics": metrics, "state": mirror.state_dict(), "optimizer": optimizer_state}, out)


def main(out_dir: str) -> None:
    launch = distributed.Launch.from_env()
    assert launch is not None and launch.world_size == 2, "run under torchrun with 2 processes"
    control = distributed.init_process_group(torch.device("cpu"))
    out = Path(out_dir)
    for name, scenario in SCENARIOS.items():
        run_sharded(scenario, out / f"{name}.pt")
    run_driver(DRIVER, control, out / "driver.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
