"""The LLM-ASR training stack the training and equivalence tiers share: a tiny corpus and warm start,
the rule-reward, encoder and rollout services on loopback, a job over them, and a recording Progress."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from speechrl.services.encoder.server import EncoderConfig
from speechrl.services.encoder.server import start as start_encoder
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig
from speechrl.services.rollout.server import start as start_rollout
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.trainer.jobs.asr import AsrJobConfig
from speechrl.trainer.jobs.checkpoint import latest_checkpoint
from speechrl.trainer.recipes.asr_data import DataConfig, build_asr_dataset
from speechrl.trainer.recipes.warmstart import WarmStartConfig, run_warmstart
from tests.support.servers import serve_in_thread


@dataclass
class Stack:
    policy: Path
    manifest: Path
    encoder: str
    rollout: str
    rules: str


def asr_warm_start(root: Path) -> tuple[Path, Path]:
    """A tiny corpus and warm start under root: (policy folder, manifest)."""
    data = build_asr_dataset(DataConfig(out=str(root / "data"), train=6, dev=2, test=0, long_test=0), progress=False)
    policy = root / "policy"
    run_warmstart(WarmStartConfig(data=str(data.parent), out=str(policy), hidden_size=64, num_layers=1, epochs=1,
                                  batch_size=6, eval_splits="", threads=1))
    return policy, data


@contextmanager
def asr_services(policy: Path, data: Path, **gpu_settings: Any) -> Iterator[Stack]:
    """The services an asr-grpo job calls, on loopback; gpu_settings go to the encoder and the rollout
    (e.g. lease_device, residency, redis_url: the two take turns on one leased device)."""
    configs = [(start_rules, RulesConfig(port=free_port())),
               (start_encoder, EncoderConfig(port=free_port(), backend="ct2-whisper", model_path=str(policy / "frontend"),
                                             threads=1, **gpu_settings)),
               (start_rollout, RolloutConfig(port=free_port(), model_path=str(policy), threads=1, **gpu_settings))]
    with ExitStack() as servers:
        ports = [servers.enter_context(serve_in_thread(lambda s=start, c=cfg: s(c))).port for start, cfg in configs]
        yield Stack(policy, data, encoder=f"127.0.0.1:{ports[1]}", rollout=f"127.0.0.1:{ports[2]}",
                    rules=f"127.0.0.1:{ports[0]}")


def asr_stack(root: Path) -> Iterator[Stack]:
    """A tiny corpus and warm start under root, and the services an asr-grpo job calls (a module fixture's body)."""
    with asr_services(*asr_warm_start(root)) as stack:
        yield stack


def asr_job(stack: Stack, out: Path, steps: int, redis_url: str) -> AsrJobConfig:
    """A small asr-grpo job over stack, under the lease of cpu:0."""
    return AsrJobConfig(policy=str(stack.policy), data=str(stack.manifest), steps=steps, out_dir=str(out),
                        eval_split="dev", eval_size=2, eval_every=2, checkpoint_every=1, encoder=stack.encoder,
                        rollout=stack.rollout, rules=stack.rules, lease_device="cpu:0", redis_url=redis_url,
                        grpo={"group_size": 3, "batch_size": 2, "mini_batch_size": 6, "learning_rate": 1e-3,
                              "max_completion_length": 32})


def assert_most_weights_moved(initial: Path, out: Path, checkpoint_name: str) -> None:
    """The run's latest checkpoint is checkpoint_name and more than half its weight tensors differ from initial's."""
    before = load_file(str(initial / "model.safetensors"))
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == checkpoint_name
    trained = load_file(str(checkpoint / "policy" / "model.safetensors"))
    moved = [name for name in before if not torch.equal(before[name], trained[name])]
    assert len(moved) > len(before) // 2, f"only {moved} changed"


def assert_lora_merged(initial: Path, out: Path, checkpoint_name: str) -> None:
    """The run's latest checkpoint is checkpoint_name and holds a LoRA run's adapters beside the whole model with
    them merged: the same tensor names as initial's, the adapted projections moved and nothing else."""
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == checkpoint_name
    assert (checkpoint / "policy" / "adapter" / "adapter_config.json").is_file()
    before = load_file(str(initial / "model.safetensors"))
    merged = load_file(str(checkpoint / "policy" / "model.safetensors"))
    assert before.keys() == merged.keys(), "the merged checkpoint keeps the policy's own tensor names"
    moved = [name for name in before if not torch.equal(before[name], merged[name])]
    assert moved and all(name.endswith("_proj.weight") and "audio_tower" not in name for name in moved), moved


class Recorder:
    """A Progress that keeps every report."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Any]]] = []
        self.resumed_from: int | None = None

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.steps.append((step, metrics))

    def resumed(self, step: int) -> None:
        self.resumed_from = step

    def cancelled(self) -> bool:
        return False
