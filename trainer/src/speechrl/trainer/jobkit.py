"""Parts every RL job kind shares (asr_job, tts_job): progress, phase timing, metrics log, the
update's GPU lease, weight sync with the version check, and the outer loop with checkpoints.

A job kind supplies what differs (how a step rolls out and scores, how its policy saves) and
runs `train_loop`; what a step means is the kind's, how steps are counted, logged, checkpointed
and resumed is this module's, so both kinds resume and log the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from speechrl.client import AsyncRolloutClient
from speechrl.trainer.checkpoint import OptimizerState, TrainState, save_checkpoint


class Progress(Protocol):
    """Where a run reports: the CLI's progress bar, or the job service's Redis record."""

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None: ...

    def resumed(self, step: int) -> None:
        """The run goes on from step (its checkpoint; 0: the start): reports of later steps, made by an
        attempt that was interrupted before its next checkpoint, are void."""

    def cancelled(self) -> bool: ...


class LineProgress:
    """A Progress that prints one line per step: the label, the step, `keys` present in the metrics
    (NaN ones, components not computed in this run, left out) and the step's wall time.

    >>> LineProgress("GRPO", ("reward_mean", "reward/wer")).report(1, 8, {"reward_mean": 0.5, "reward/wer": math.nan,
    ...                                                                  "time/rollout": 1.0})
      GRPO step 1/8: reward_mean 0.500 (1.0 s)
    """

    def __init__(self, label: str, keys: Sequence[str]):
        self.label = label
        self.keys = tuple(keys)

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        parts = [f"{key.removeprefix('reward/')} {metrics[key]:.3f}" for key in self.keys
                 if key in metrics and metrics[key] == metrics[key]]
        seconds = sum(v for k, v in metrics.items() if k.startswith("time/"))
        print(f"  {self.label} step {step}/{total}: {' '.join(parts)} ({seconds:.1f} s)", flush=True)

    def resumed(self, step: int) -> None:
        pass  # printed lines stay printed

    def cancelled(self) -> bool:
        return False


def write_results(out: Path, results: dict[str, Any], markdown: str) -> None:
    """A reproduction's results: results.json, results.md (the table), and the table printed."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown)
    print(markdown)


@contextlib.contextmanager
def stage_timer(stages: dict[str, Any], name: str) -> Iterator[None]:
    """Wall seconds of a stage, into stages[name] (a reproduction's time per stage)."""
    started = time.monotonic()
    yield
    stages[name] = round(time.monotonic() - started, 1)


class PhaseTimer:
    """Wall time of each phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        start = time.perf_counter()
        yield
        self.seconds[f"time/{name}"] = time.perf_counter() - start


def mean_of(values: Sequence[float | None]) -> float:
    """Mean of the scored values (None skipped); NaN when none is scored, so a log never shows a fake 0."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else math.nan


@contextlib.asynccontextmanager
async def update_lease(lease_device: str, redis_url: str) -> AsyncIterator[None]:
    """The trainer device's GPU lease (priority high) around the update, when lease_device is set."""
    if not lease_device:
        yield
        return
    from speechrl.services.lease import GpuLease, LeaseUnavailable, lease_redis

    client = lease_redis(redis_url)
    lease = GpuLease(client, owner="trainer")
    try:
        async with contextlib.AsyncExitStack() as held:
            # A Redis outage (a restart) costs the step a wait, not the job: retry for up to a minute.
            for attempt in range(60):
                try:
                    await held.enter_async_context(lease.hold(lease_device, priority="high", timeout=600))
                    break
                except LeaseUnavailable:
                    if attempt == 59:
                        raise
                    await asyncio.sleep(1.0)
            yield
    finally:
        await client.aclose()


async def push_weights(rollout: AsyncRolloutClient, model: nn.Module, sync_dir: Path, version: int,
                       lora: bool = False) -> int:
    """Push model's weights as `version` (a full safetensors file, or the LoRA adapter folder) to the
    rollout service; returns the version it confirms (RuntimeError when it is another)."""
    sync_dir.mkdir(parents=True, exist_ok=True)
    if lora:
        path = sync_dir / f"adapter-v{version:06d}"
        await asyncio.to_thread(model.save_pretrained, str(path))  # type: ignore[operator,arg-type]  # a peft model
    else:
        path = sync_dir / f"policy-v{version:06d}.safetensors"
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        await asyncio.to_thread(save_file, state, str(path))
    confirmed = await rollout.update_weights(version, str(path), format="lora" if lora else "full")
    for old in [*sync_dir.glob("policy-v*.safetensors"), *sync_dir.glob("adapter-v*")]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    if confirmed != version:
        raise RuntimeError(f"rollout service confirmed policy version {confirmed}, expected {version}")
    return confirmed


def check_on_policy(versions: Sequence[int], version: int) -> None:
    """Every rollout came from the trainer's current weights, or RuntimeError."""
    stale = set(versions) - {version}
    if stale:
        raise RuntimeError(f"rollouts came from policy versions {sorted(stale)}, not {version}: the rollout "
                           "service is not serving the trainer's weights")


class MetricsLog:
    """metrics.jsonl and TensorBoard events of a run (a resumed run drops records past its checkpoint)."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / "metrics.jsonl"
        kept = [line for line in self.path.read_text().splitlines()
                if json.loads(line)["step"] <= resume_step] if self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional; metrics.jsonl always has everything
            self.writer = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


StepFn = Callable[[int, int], Awaitable[tuple[dict[str, Any], int]]]  # (step, version) -> (metrics, version)


async def train_loop(out: Path, state: TrainState, steps: int, progress: Progress, step: StepFn,
                     save_policy: Callable[[Path], None], optimizer: OptimizerState, *, version: int,
                     checkpoint_every: int, evaluate: Callable[[int, bool], Awaitable[dict[str, float]]] | None = None,
                     ) -> None:
    """Run steps until state.step == steps (or cancelled): log, report, evaluate and checkpoint each.

    evaluate(step, last) returns the eval metrics due at that step ({} when none are due).
    save_policy(folder) writes the policy's weights into a checkpoint folder.
    """
    log = MetricsLog(out, state.step)
    progress.resumed(state.step)
    try:
        while state.step < steps and not progress.cancelled():
            metrics, version = await step(state.step, version)
            state.step += 1
            state.version = version
            last = state.step == steps
            if evaluate is not None:
                metrics.update(await evaluate(state.step, last))
            log.write(state.step, metrics)
            progress.report(state.step, steps, metrics)
            if last or state.step % checkpoint_every == 0:
                await asyncio.to_thread(save_checkpoint, out, state, save_policy, optimizer)
    finally:
        log.close()


def sampled_sequences(samples: Sequence[Any], eos_token_id: int) -> list[list[int]]:
    """Each sample's token ids, with EOS appended where it stopped (EOS is what the policy sampled there)."""
    return [list(s.token_ids) + ([eos_token_id] if s.finish_reason == "stop" else []) for s in samples]


class RunFolders(Protocol):
    """What a job config says about its folders (AsrJobConfig, TtsJobConfig)."""

    out_dir: str
    sync_dir: str


def sync_dir(config: RunFolders) -> Path:
    """Where the job writes new weights for the rollout service: sync_dir, else <out_dir>/sync."""
    return Path(config.sync_dir) if config.sync_dir else Path(config.out_dir) / "sync"


def pad_right(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [N, T] and mask [N, T] (1 on real tokens); T >= 1 even when all are empty."""
    width = max(1, max((len(s) for s in sequences), default=0))
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)  # [N, T]
    mask = torch.zeros(len(sequences), width, dtype=torch.long)  # [N, T]
    for i, sequence in enumerate(sequences):
        ids[i, :len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[i, :len(sequence)] = 1
    return ids, mask
