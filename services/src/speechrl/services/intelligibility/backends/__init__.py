"""ASR backends of the intelligibility scorer: one module per runtime, one constructor signature.

A backend turns a batch of 16 kHz mono float32 utterances into transcripts in one call. It never
sees requests, references or errors of other items: the engine decodes audio and scores text.

>>> sorted(BACKENDS)
['faster-whisper', 'qwen3-asr', 'qwen3-asr-vllm', 'transformers']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from speechrl.services.backend_registry import ImportedOnUse

# Whisper's encoder sees 30 s windows; longer utterances need the runtimes' long-form paths.
WINDOW_SECONDS = 30.0

# Decoding stops after this many new tokens per second of audio (plus DECODE_TOKENS_FLOOR).
# Fast speech is ~4 words (~6 BPE tokens) per second and Chinese ~10 tokens per second, so the
# cap never cuts a real transcript; it bounds hallucination loops on noise, which would
# otherwise run to Whisper's 448-token limit and hold up every item batched with them.
DECODE_TOKENS_PER_SECOND = 25
DECODE_TOKENS_FLOOR = 16


def max_new_tokens(longest_seconds: float, model_limit: int) -> int:
    """The decode budget for a batch whose longest utterance lasts longest_seconds.

    >>> max_new_tokens(2.0, 444), max_new_tokens(30.0, 444)
    (66, 444)
    """
    return min(model_limit, DECODE_TOKENS_FLOOR + math.ceil(longest_seconds * DECODE_TOKENS_PER_SECOND))


@dataclass(frozen=True)
class BackendOptions:
    """What every backend constructor takes; each field is documented on the server's Config."""

    model_path: str = ""  # "" means the backend's offline default model
    device: str = "cpu"
    compute_type: str = "auto"
    beam_size: int = 1
    threads: int = 0  # 0 means all cores
    gpu_memory_utilization: float = 0.2  # qwen3-asr-vllm on cuda: the share of the GPU its engine takes
    kv_cache_mb: int = 0  # qwen3-asr-vllm: 0 is 256 MiB on CPU, gpu_memory_utilization's share on cuda
    enforce_eager: bool = False  # qwen3-asr-vllm: no torch.compile / CUDA graphs
    sleep_mode: bool = False  # qwen3-asr-vllm: enable vLLM's sleep/wake (cuda only)


class AsrBackend(Protocol):
    """A loaded ASR model that transcribes a batch of utterances in one call."""

    name: str  # registry key, e.g. "faster-whisper"
    model: str  # where the weights came from (a folder)
    sample_rate: int  # the rate transcribe() expects, in Hz
    languages: frozenset[str]  # ISO 639-1 codes the model can be told to transcribe

    def transcribe(self, audios: list[np.ndarray], languages: list[str]) -> list[str]:
        """Transcripts of mono float32 utterances at sample_rate, index-aligned with audios."""
        ...

    def load_to_device(self) -> None:
        """Put the weights on the compute device (called in the model thread, under the GPU lease)."""
        ...

    def offload(self, mode: str) -> None:
        """Free the device between leased batches: mode "offload" or "sleep" (see residency.py)."""
        ...


_MODULES = "speechrl.services.intelligibility.backends"
BACKENDS: dict[str, Callable[[BackendOptions], AsrBackend]] = {
    "faster-whisper": ImportedOnUse(f"{_MODULES}.faster_whisper", "FasterWhisperBackend"),
    "transformers": ImportedOnUse(f"{_MODULES}.transformers_whisper", "TransformersWhisperBackend"),
    "qwen3-asr": ImportedOnUse(f"{_MODULES}.qwen3_asr", "Qwen3AsrBackend"),
    # vLLM lives in its own venv (.venv-vllm, scripts/bootstrap.sh)
    "qwen3-asr-vllm": ImportedOnUse(f"{_MODULES}.qwen3_asr_vllm", "Qwen3AsrVllmBackend"),
}


def load_backend(name: str, options: BackendOptions) -> AsrBackend:
    """Build the backend registered under name."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown ASR backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(options)
