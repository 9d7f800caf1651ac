"""Speaker-embedding backends: one module each, chosen by name from BACKENDS.

Every backend is built as `factory(model_path, device, threads)` and offers:

* `sample_rate` (Hz) — the engine decodes request audio to this rate;
* `name` (e.g. "resemblyzer") and `model` (what was loaded, for GetServiceStatus);
* `dim` — the embedding size D;
* `min_seconds` — shorter audio is refused per item (the model cannot embed it);
* `embed(audios) -> np.ndarray` — one float32 [N, D] row per mono waveform, L2-normalised,
  computed in as few forwards as the model allows (one for the whole batch where it can);
* `load_to_device()` / `offload(mode)` — residency.Residable: backends are built on the CPU and
  enter their device on the first batch, under the GPU lease when the server has one.

Backend modules import their heavy dependencies (torch, onnxruntime, wespeaker) at module level;
the factories import the module only when that backend is chosen.

>>> sorted(BACKENDS)
['resemblyzer', 'wespeaker-checkpoint', 'wespeaker-onnx']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from speechrl.services.backend_registry import ImportedOnUse


class SpeakerBackend(Protocol):
    """A speaker-embedding model with its feature front-end."""

    sample_rate: int
    name: str
    model: str
    dim: int
    min_seconds: float

    def embed(self, audios: list[np.ndarray]) -> np.ndarray:
        """float32 [N, D], L2-normalised rows, for N mono waveforms at sample_rate."""
        ...

    def load_to_device(self) -> None:
        """Put the model on its configured device (a no-op on the CPU)."""
        ...

    def offload(self, mode: str) -> None:
        """Free the device between leased batches ("offload" or "sleep"; both mean: to CPU memory)."""
        ...


BackendFactory = Callable[[str, str, int], SpeakerBackend]


_MODULES = "speechrl.services.speaker.backends"
BACKENDS: dict[str, BackendFactory] = {
    "resemblyzer": ImportedOnUse(f"{_MODULES}.resemblyzer_backend", "ResemblyzerBackend"),
    "wespeaker-onnx": ImportedOnUse(f"{_MODULES}.wespeaker_onnx", "WespeakerOnnxBackend"),
    "wespeaker-checkpoint": ImportedOnUse(f"{_MODULES}.wespeaker_checkpoint", "WespeakerCheckpointBackend"),
}


def load_backend(name: str, model_path: str = "", device: str = "cpu", threads: int = 0) -> SpeakerBackend:
    """Build the backend registered under name."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown speaker backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(model_path, device, threads)


def intra_op_threads(threads: int) -> int:
    """Threads for one model call: the configured count, or every core when 0.

    Inter-op parallelism stays at 1 everywhere: the batcher runs one model call at a time, so
    parallel operators would only compete with the intra-op pool for the same cores.
    """
    return threads if threads > 0 else (os.cpu_count() or 1)


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads, and inter-op to 1 (torch allows that only once per process)."""
    import torch

    torch.set_num_threads(intra_op_threads(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set, or parallel work has started: torch refuses a second call


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, as float32; a zero row stays zero (the engine refuses it)."""
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def torch_device(device: str) -> str:
    """The torch device string of a config device ("cpu", "cuda:0"), failing clearly without CUDA."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


def module_device(module: Any) -> Any:
    """Where a torch module's weights are now (it moves between CPU and GPU under the lease)."""
    return next(module.parameters()).device


def run_grouped_by_length(feats: list[np.ndarray], forward: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Embed [T_i, F] feature matrices with one forward per distinct T_i; rows back in input order.

    wespeaker models take no mask: zero or repeat padding would enter their statistics pooling,
    so one utterance's embedding would depend on the lengths of its batch neighbours (a reward
    must not). Utterances of equal length share a forward exactly; others run apart.

    >>> out = run_grouped_by_length([np.ones((3, 2)), np.ones((5, 2)), np.zeros((3, 2))],
    ...                             lambda x: x.sum(axis=1))  # [G, T, F] -> [G, F]
    >>> out.tolist()
    [[3.0, 3.0], [5.0, 5.0], [0.0, 0.0]]
    """
    groups: dict[int, list[int]] = {}
    for index, f in enumerate(feats):
        groups.setdefault(f.shape[0], []).append(index)
    rows: list[np.ndarray | None] = [None] * len(feats)
    for indices in groups.values():
        out = forward(np.stack([feats[i] for i in indices]))  # [G, T, F] -> [G, D]
        for i, row in zip(indices, out, strict=True):
            rows[i] = row
    return np.stack(rows)  # type: ignore[arg-type]
