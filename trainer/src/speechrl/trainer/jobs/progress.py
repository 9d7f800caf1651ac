"""How a run reports: where its steps go (a progress bar, the job service's record, printed lines),
each step's phase times, and its metrics log (metrics.jsonl and TensorBoard events)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


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


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a step's metrics: what TensorBoard and the trackers (trackers.py) get.

    >>> scalars({"kl": 0.5, "fence": 3, "wer": math.nan, "lora": True, "note": "x"})
    {'kl': 0.5, 'fence': 3.0, 'lora': 1.0}
    """
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)}


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
            for key, value in scalars(metrics).items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
