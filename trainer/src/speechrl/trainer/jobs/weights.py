"""The trainer's weights to the rollout service: where they are written, the push whose reply must
echo the new version, and the check that every rollout came from the weights just pushed."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn

from speechrl.client import AsyncRolloutClient
from speechrl.trainer.core.policy import plain_state


class RunFolders(Protocol):
    """What a job config says about its folders (AsrJobConfig, TtsJobConfig)."""

    out_dir: str
    sync_dir: str


def sync_dir(config: RunFolders) -> Path:
    """Where the job writes new weights for the rollout service: sync_dir, else <out_dir>/sync."""
    return Path(config.sync_dir) if config.sync_dir else Path(config.out_dir) / "sync"


async def push_weights(rollout: AsyncRolloutClient, model: nn.Module, sync_dir: Path, version: int,
                       lora: bool = False, fence: int = 0) -> int:
    """Push model's weights as `version` (a full safetensors file, or the LoRA adapter folder) to the
    rollout service; returns the version it confirms (RuntimeError when it is another). A full push of a
    LoRA model (a peft model, lora False) sends its base weights, which its adapters then go on top of.

    fence: the fencing token of the lease grant the weights were made under; the service refuses a push
    older than its last accepted one (StaleFenceError), so a trainer whose lease lapsed cannot overwrite
    a newer policy. 0: no lease."""
    sync_dir.mkdir(parents=True, exist_ok=True)
    if lora:
        path = sync_dir / f"adapter-v{version:06d}"
        await asyncio.to_thread(model.save_pretrained, str(path))  # type: ignore[operator,arg-type]  # a peft model
    else:
        path = sync_dir / f"policy-v{version:06d}.safetensors"
        state = plain_state(model, merge=False) if isinstance(model, PeftModel) else model.state_dict()
        await asyncio.to_thread(save_file, untied(state), str(path))
    confirmed = await rollout.update_weights(version, str(path), format="lora" if lora else "full", fence=fence)
    for old in [*sync_dir.glob("policy-v*.safetensors"), *sync_dir.glob("adapter-v*")]:
        if old != path:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    if confirmed != version:
        raise RuntimeError(f"rollout service confirmed policy version {confirmed}, expected {version}")
    return confirmed


def untied(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU with each tied tensor once, under its first name (a tied head is its embedding
    table: safetensors refuses aliases, and the receiver's tied head follows its table)."""
    seen: set[tuple[int, torch.device]] = set()
    state = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def check_on_policy(versions: Sequence[int], version: int) -> None:
    """Every rollout came from the trainer's current weights, or RuntimeError."""
    stale = set(versions) - {version}
    if stale:
        raise RuntimeError(f"rollouts came from policy versions {sorted(stale)}, not {version}: the rollout "
                           "service is not serving the trainer's weights")
