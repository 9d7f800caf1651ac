"""A vLLM engine inside a service process: its construction arguments and its sleep-mode residency.

The rollout generator (rollout/backends/vllm_backend.py) and the qwen3-asr-vllm intelligibility backend both
run vllm.LLM in the service's own process on one device, and take turns on a shared GPU the same way: offload
and sleep are vLLM's sleep mode level 1 (weights to CPU memory, KV cache dropped), which needs
enable_sleep_mode and so cuda. vLLM's CPU worker has no sleep mode: on CPU the model stays where it is.
"""

from __future__ import annotations

import os
from typing import Any

AUTO_DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
CPU_KV_CACHE_MB = 256  # on CPU vLLM would otherwise reserve gpu_memory_utilization of *host* memory


def vllm_engine_args(model: str, device: str, dtype: str, *, seed: int = 0, gpu_memory_utilization: float = 0.5,
                     kv_cache_mb: int = 0, enforce_eager: bool = False, sleep_mode: bool = False) -> dict[str, Any]:
    """vllm.LLM's arguments for model on device, after the process settings they need: the engine core in
    this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set), cuda:N as the only visible GPU (vLLM takes the
    first), and on CPU an explicit KV cache size.

    >>> args = vllm_engine_args("/m", "cpu", "auto", sleep_mode=True)
    >>> args["dtype"], args["enable_sleep_mode"], args["kv_cache_memory_bytes"] >> 20
    ('float32', False, 256)
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kind, _, index = device.partition(":")
    if kind == "cuda" and index not in ("", "0"):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", index)
    args: dict[str, Any] = dict(model=model, dtype=AUTO_DTYPES[kind] if dtype == "auto" else dtype, seed=seed,
                                enforce_eager=enforce_eager, enable_sleep_mode=sleep_mode and kind == "cuda")
    if kind == "cpu":
        args["kv_cache_memory_bytes"] = (kv_cache_mb or CPU_KV_CACHE_MB) << 20
    else:
        args["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_mb:
            args["kv_cache_memory_bytes"] = kv_cache_mb << 20
    return args


def kv_cache_bytes(worker: Any) -> int:
    """Bytes of the KV cache tensors a vLLM worker allocated (each storage once: layers may share one), run in the
    worker by collective_rpc. vLLM sizes the cache itself on a GPU (gpu_memory_utilization's share of what the
    weights leave), so this is the one place the ledger can learn it."""
    import torch

    seen: set[int] = set()
    total = 0
    pending: list[Any] = [getattr(worker.model_runner, "kv_caches", [])]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return total


class InProcessVllm:
    """What a backend holding a vllm.LLM as self.llm shares: the residency methods (residency.DeviceGuard's),
    with self.sleep_mode (the engine was built with enable_sleep_mode) and self._weight_bytes (the weights' part of
    the ledger's figure: vLLM reports none) set by the backend, and close() for the server's stop."""

    llm: Any
    sleep_mode: bool
    _weight_bytes: int
    _asleep: bool = False
    _kv_bytes: int | None = None

    def load_to_device(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def weight_bytes(self) -> int:
        """Bytes the engine holds on the device while resident: the weights and the KV cache it reserved (most of a
        GPU engine's memory). The ledger asks before a wake-up (residency.DeviceGuard reports before the weights
        move in), so this is what the engine is about to hold, asleep or not."""
        if self._kv_bytes is None:  # sized once, at the first report; a wake-up allocates the same again
            self._kv_bytes = sum(self.llm.collective_rpc(kv_cache_bytes))
        return self._weight_bytes + self._kv_bytes

    def offload(self, mode: str) -> None:
        if not self.sleep_mode:
            return  # CPU, or started without sleep mode: nothing to free
        self.llm.sleep(level=1)  # weights to CPU memory, KV cache dropped; "offload" means the same here
        self._asleep = True

    def close(self) -> None:
        """Shut the engine down now. Left to the garbage collector, a dead engine's teardown can land inside the
        start of the next one in this process (vLLM freezes the heap at start) and wipe its distributed state."""
        self.llm.llm_engine.engine_core.shutdown()
