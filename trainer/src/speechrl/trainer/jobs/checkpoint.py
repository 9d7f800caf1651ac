"""Checkpoints of a training run: written whole or not at all, found again after a crash.

Layout: <out_dir>/checkpoints/step-000010/ holding the policy folder (AsrPolicy.save),
optimizer.pt and state.json (step, policy version, RNG state). A checkpoint is written to a
temporary folder and renamed into place, so a run killed mid-write leaves the previous one intact.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"


class OptimizerState(Protocol):
    """A torch optimizer, or distributed.DataParallelUpdate, which gathers and scatters the sharded state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> None: ...


@dataclass
class TrainState:
    """What a resumed run needs besides the weights."""

    step: int = 0
    version: int = 0  # the policy version last pushed to the rollout service
    fence: int = 0  # the fencing token of the lease grant of the last update (0: no lease)
    rng: list[Any] = field(default_factory=list)  # random.getstate(), JSON-friendly

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> TrainState:
        values = json.loads((folder / STATE_FILE).read_text())
        return cls(**values)


class StaleCheckpoint(RuntimeError):
    """A checkpoint of the same step already exists, written under a newer lease grant (a higher fence):
    this writer's lease lapsed and a newer holder has written since."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    folders = sorted(p for p in checkpoint_dir(out_dir).glob("step-*") if (p / STATE_FILE).exists())
    return folders[-1] if folders else None


def save_checkpoint(out_dir: str | Path, state: TrainState, save_policy: Any, optimizer: OptimizerState,
                    keep: int = 2) -> Path:
    """Write a checkpoint atomically; save_policy(folder) writes the weights. Keeps the newest `keep`.

    The newest fence wins a race on the same step: over a checkpoint of this step written under a higher
    fencing token, nothing is written and StaleCheckpoint is raised."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    _refuse_stale(final, state)
    for old in root.glob(f".partial-{state.step:06d}*"):  # left by a writer killed mid-write
        shutil.rmtree(old, ignore_errors=True)
    partial = root / f".partial-{state.step:06d}-{secrets.token_hex(4)}"  # two writers never share one
    partial.mkdir()
    save_policy(partial)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    state.rng = _json_rng(random.getstate())
    state.save(partial)
    try:
        _refuse_stale(final, state)  # again: another writer may have finished while we wrote
    except StaleCheckpoint:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(p for p in root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _refuse_stale(final: Path, state: TrainState) -> None:
    if (final / STATE_FILE).exists():
        existing = TrainState.load(final).fence
        if existing > state.fence:
            raise StaleCheckpoint(f"{final}: written under fence {existing}, newer than this writer's {state.fence}; "
                                  "its lease lapsed and a newer holder has checkpointed this step")


def restore_rng(state: TrainState) -> None:
    if state.rng:
        version, internal, gauss = state.rng
        random.setstate((version, tuple(internal), gauss))


def load_optimizer(folder: Path, optimizer: OptimizerState) -> None:
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))


def _json_rng(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]
