"""The trainer's turn on its device: the policy update takes the device's GPU lease like every service
does, its memory leaves the device between updates, and a lost lease changes nothing.

    residency keep     policy, reference and optimizer state stay on the device between updates
    residency offload  they move to (pinned) CPU memory after each update and back at the next grant,
                       the copies asynchronous where the memory is pinned (the default on a shared GPU)

It is the services' own mechanism (speechrl.services.residency): TrainerResidency is a Residable,
the turn runs in a DeviceGuard, which takes the lease (priority high), moves the weights in and out
and reports to the device-memory ledger. What the trainer adds is that a lost lease leaves no trace:
before each optimizer step the update checks the lease is still held, and when it is not (or it
lapsed by the end) the weights and optimizer state are put back as they were before the update
(TrainState.capture / restore) and LeaseLost is raised, so the driver abandons the step (no
optimizer step kept, no weight push) and retries it from the same rollouts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from speechrl.services.lease import LeaseLost, LeaseUnavailable
from speechrl.services.residency import DeviceGuard, module_bytes
from speechrl.trainer.core.policy import trainable_parameters
from speechrl.trainer.core.step import RolloutBatch

log = logging.getLogger(__name__)

# update(batch, before_optimizer_step) -> metrics: grpo_update bound to the policy, reference and optimizer
Update = Callable[[RolloutBatch, Callable[[], None] | None], dict[str, float]]


def _move(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """tensor on device; to a CUDA device's host side through pinned memory, so the copy can overlap."""
    if device == "cpu" and tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
    return tensor.to(device, non_blocking=tensor.device.type == "cpu" and tensor.is_pinned())


class TrainerResidency:
    """The trainer's policy, reference and optimizer state as one Residable (speechrl.services.residency).

    Parameters keep their identity (their `.data` moves), so the optimizer's references stay valid.
    AdamW's step counters stay where torch wants them (on the CPU unless capturable).
    """

    def __init__(self, modules: Sequence[nn.Module], optimizer: torch.optim.Optimizer, device: str):
        self.modules = list({id(m): m for m in modules}.values())  # a LoRA reference is the policy itself
        self.optimizer = optimizer
        self.device = device

    def _tensors(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for module in self.modules:
            for tensor in (*module.parameters(), *module.buffers()):
                seen[id(tensor)] = tensor
        return list(seen.values())

    def _place(self, device: str) -> None:
        with torch.no_grad():
            for tensor in self._tensors():
                tensor.data = _move(tensor.data, device)
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = _move(value, device)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed before anyone reads them

    def load_to_device(self) -> None:
        self._place(self.device)

    def offload(self, mode: str) -> None:
        self._place("cpu")
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def weight_bytes(self) -> int:
        optimizer_bytes = sum(v.numel() * v.element_size() for state in self.optimizer.state.values()
                              for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step")
        return module_bytes(self.modules) + optimizer_bytes


def _cpu_copy(value: Any) -> Any:
    """value (a state dict: nested dicts and lists of tensors) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(v) for v in value]
    return value


class RestorePoint:
    """CPU copies of the trainable weights and the optimizer state, taken before an update, to undo it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.weights = [(p, p.detach().to("cpu", copy=True)) for p in trainable_parameters(model)]
        self.optimizer_state = _cpu_copy(optimizer.state_dict())

    def restore(self) -> None:
        with torch.no_grad():
            for parameter, saved in self.weights:
                parameter.copy_(saved)  # wherever the parameter lives now
        self.optimizer.load_state_dict(self.optimizer_state)  # moved to each parameter's device by torch


class UpdateTurn:
    """The policy update as the trainer's turn on its device: under the device's lease (when it has one),
    with the trainer's memory moved in and out by `guard`'s residency, all or nothing."""

    def __init__(self, update: Update, guard: DeviceGuard, model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, unavailable_retries: int = 60):
        self.update_fn = update
        self.guard = guard
        self.model, self.optimizer = model, optimizer  # None: an update that cannot be undone (torchrun)
        self.unavailable_retries = unavailable_retries
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="trainer-update")

    async def update(self, batch: RolloutBatch) -> tuple[dict[str, float], int]:
        """(metrics, fencing token of the grant it ran under; 0 without a lease). LeaseLost when the lease
        lapsed before the update finished: then nothing of it is kept (the weights and the optimizer are
        as they were), unless it cannot be undone, which is a RuntimeError that ends the job."""
        lease = self.guard.lease
        restore = RestorePoint(self.model, self.optimizer) if lease is not None and self.model is not None \
            and self.optimizer is not None else None
        fence = 0

        def run(batches: list[RolloutBatch]) -> list[dict[str, float]]:
            nonlocal fence
            grant = self.guard.grant
            fence = grant.fence if grant is not None else 0

            def check() -> None:
                if lease is not None and grant is not None and not lease.still_held(grant):
                    raise LeaseLost(f"lease of {grant.device} (fence {grant.fence}) lapsed during the update")

            return [self.update_fn(batches[0], check)]

        for attempt in range(self.unavailable_retries):
            try:
                [metrics] = await self.guard.run(self.executor, run, [batch])
                return metrics, fence
            except LeaseUnavailable:
                # A Redis outage (a restart) costs the step a wait, not the job: retry for up to a minute.
                if attempt == self.unavailable_retries - 1:
                    raise
                await asyncio.sleep(1.0)
            except LeaseLost:
                if lease is not None and restore is None:
                    raise RuntimeError("the GPU lease lapsed during an update that cannot be undone (a data-parallel "
                                       "update's shards); the job stops: run it again to resume from its checkpoint") \
                        from None
                if restore is not None:
                    await asyncio.get_running_loop().run_in_executor(self.executor, restore.restore)
                raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Release the turn's thread and Redis connections (its last ledger entry stays: what it left)."""
        self.executor.shutdown(wait=False)
        if self.guard.lease is not None:
            await self.guard.lease.client.aclose()
        if self.guard.ledger is not None:
            self.guard.ledger.client.close()
