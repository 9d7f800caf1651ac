"""Where a GPU service's model lives between batches, and the lease around each batch.

Policies (config `residency`):
  keep    - the model stays on the device; the lease still orders GPU use between services.
  offload - the model moves to CPU memory after each leased batch and back on the next grant,
            so the device's memory is free for the next holder (the paper's alternating use).
  sleep   - like offload, through the backend's own sleep/wake (vLLM's sleep mode).
Without a lease device (CPU laptop, or a GPU the service owns alone) the model is simply resident.

With a lease, every residency change is reported to the device-memory ledger (ledger.py) while the
lease is held: "resident" once granted, before the weights move in; "offloaded" / "asleep" after
they have left, before the release. The trainer's update takes its turn through the same guard
(speechrl.trainer.jobs.turn).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar

from speechrl.services.config import ServerConfig
from speechrl.services.lease import GpuLease, Grant, LeaseLost, LeaseSettings, lease_redis
from speechrl.services.ledger import DeviceLedger, LedgerEntry
from speechrl.v1 import common_pb2

log = logging.getLogger(__name__)

RESIDENCY_POLICIES = ("keep", "offload", "sleep")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Residable(Protocol):
    """A model that can leave and re-enter its device. Both calls run in the model thread."""

    def load_to_device(self) -> None:
        """Put the weights on the compute device (or wake them)."""

    def offload(self, mode: str) -> None:
        """Free the device: mode "offload" moves weights to CPU memory, "sleep" uses the backend's sleep."""


def weight_bytes(model: object) -> int:
    """Bytes of a Residable's weights and buffers, from its `weight_bytes()` when it has one; 0 when not known
    (a runtime such as CTranslate2 or vLLM that reports no figure)."""
    measure = getattr(model, "weight_bytes", None)
    return int(measure()) if callable(measure) else 0


def module_bytes(modules: Sequence[Any]) -> int:
    """Bytes of the parameters and buffers of torch modules (each tensor once); a stand-in without them (a
    CTranslate2 model behind `.to()`) counts by its own weight_bytes(), else 0."""
    seen: dict[int, int] = {}
    other = 0
    for module in modules:
        if not hasattr(module, "parameters"):
            other += weight_bytes(module)
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values()) + other


class TorchResidency:
    """Residable for torch modules: `.to(device)` on grant, `.to("cpu")` on offload."""

    def __init__(self, modules: Callable[[], Sequence[Any]], device: str):
        self.modules = modules
        self.device = device

    def load_to_device(self) -> None:
        for module in self.modules():
            module.to(self.device)

    def offload(self, mode: str) -> None:
        for module in self.modules():
            module.to("cpu")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def weight_bytes(self) -> int:
        return module_bytes(self.modules())


class DeviceGuard:
    """Runs each model batch under the device's lease, with the model moved in and out per policy.

    The lease is taken on the event loop (waiting costs no thread) and held across the batch, which
    runs in the model's executor thread.
    """

    def __init__(self, model: Residable, *, lease: GpuLease | None, device: str, policy: str = "keep",
                 priority: str = "normal", wait_timeout_s: float | None = None, ledger: DeviceLedger | None = None):
        if policy not in RESIDENCY_POLICIES:
            raise ValueError(f"residency must be one of {RESIDENCY_POLICIES}, got {policy!r}")
        self.model = model
        self.lease = lease
        self.device = device
        self.policy = policy
        self.priority = priority
        self.wait_timeout_s = wait_timeout_s
        self.residency = "offloaded"
        self.grant: Grant | None = None
        self.ledger = ledger

    def _report(self) -> None:
        if self.ledger is not None:
            self.ledger.report(self.device, self.residency,
                               weight_bytes(self.model) if self.residency == "resident" else 0)

    def _run(self, fn: Callable[[list[ItemT]], list[ResultT]], items: list[ItemT]) -> list[ResultT]:
        if self.residency != "resident":
            self.residency = "resident"
            self._report()  # before the weights move in: the ledger never under-states who is on the device
            self.model.load_to_device()
        try:
            return fn(items)
        finally:
            if self.lease is not None and self.policy != "keep":
                self.model.offload(self.policy)
                self.residency = "asleep" if self.policy == "sleep" else "offloaded"
                self._report()  # after they have left, still under the lease

    async def run(self, executor: Executor, fn: Callable[[list[ItemT]], list[ResultT]],
                  items: list[ItemT]) -> list[ResultT]:
        """Run fn(items) in executor, holding the lease when there is one."""
        loop = asyncio.get_running_loop()
        if self.lease is None:
            return await loop.run_in_executor(executor, self._run, fn, items)
        async with self.lease.hold(self.device, self.priority, self.wait_timeout_s) as grant:
            self.grant = grant
            try:
                results = await loop.run_in_executor(executor, self._run, fn, items)
            finally:
                self.grant = None
            # The batch cannot be stopped mid-way, but a result computed after the lease lapsed
            # (Redis unreachable, or restarted and reclaimed by no one) is refused: UNAVAILABLE, retried.
            if not self.lease.still_held(grant):
                raise LeaseLost(f"lease of {self.device} lapsed during the batch; retry it")
            return results

    def memory_state(self) -> list[common_pb2.DeviceMemory]:
        """This process's entries of the device-memory ledger, for a GetServiceStatus reply."""
        entries: list[LedgerEntry] = list(self.ledger.last.values()) if self.ledger is not None else []
        return [memory_proto(e) for e in entries]

    def lease_state(self) -> common_pb2.LeaseState:
        """The lease part of a GetServiceStatus reply."""
        grant = self.grant
        return common_pb2.LeaseState(device=self.device if self.lease else "", held=grant is not None,
                                     fencing_token=grant.fence if grant else 0)


def memory_proto(entry: LedgerEntry) -> common_pb2.DeviceMemory:
    return common_pb2.DeviceMemory(device=entry.device, residency=entry.residency, weight_bytes=entry.weight_bytes,
                                   allocated_bytes=entry.allocated_bytes, reserved_bytes=entry.reserved_bytes,
                                   updated_unix_ms=int(entry.updated * 1000))


def make_guard(config: ServerConfig, model: Residable, owner: str) -> DeviceGuard:
    """The DeviceGuard a server's config asks for: leased, and reporting to the ledger, when lease_device is set."""
    lease = ledger = None
    if config.lease_device:
        lease = GpuLease(lease_redis(config.redis_url), owner=owner,
                         settings=LeaseSettings(ttl_ms=config.lease_ttl_ms))
        ledger = DeviceLedger(config.redis_url, owner)
    return DeviceGuard(model, lease=lease, device=config.lease_device or config.device, policy=config.residency,
                       priority=config.lease_priority, wait_timeout_s=config.lease_wait_seconds, ledger=ledger)
