"""Policy runtimes of the rollout generator: one module per runtime, one constructor signature.

A backend samples completions for prompts that the engine has already checked and tokenised:
each prompt is optional embeddings followed by token ids. It never sees requests or proto
messages, and it reports bad weights (UpdateWeights) as RequestInvalid naming the field.

Logprobs, in every backend, are those of the distribution each token was drawn from: the log-softmax
of the logits after temperature, the speech-token mask, top-k and top-p (vLLM's
"processed_logprobs"). Greedy (temperature 0) reports the log-softmax of the masked logits at
temperature 1, since a point mass has no useful log-probability.

>>> sorted(BACKENDS)
['transformers', 'vllm']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from speechrl.services.backend_registry import ImportedOnUse
from speechrl.services.errors import RequestInvalid


@dataclass(frozen=True)
class BackendOptions:
    """What every backend constructor takes; each field is documented on the server's Config."""

    model_path: str
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on cuda
    seed: int = 0
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    threads: int = 0  # 0: all cores
    kv_cache_mb: int = 0  # vllm: 0 is 256 MiB on CPU, gpu_memory_utilization's share on cuda
    gpu_memory_utilization: float = 0.5
    max_lora_rank: int = 0  # vllm: 0 turns LoRA off
    enforce_eager: bool = False
    sleep_mode: bool = False  # vllm: enable sleep/wake (cuda only)


@dataclass(frozen=True)
class Sampling:
    """How one prompt is sampled; field names follow the proto's SamplingParams."""

    n: int = 1
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # 1 is off
    top_k: int = 0  # 0 is off
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None  # sample j of a prompt draws from seed + j (vLLM's rule)

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, "n", f"must be >= 1, got {self.n}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
             f"must be finite and >= 0 (0 is greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (0 in the request means 1), got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"must be >= 0 (0 is off), got {self.top_k}"),
            (self.max_tokens >= 1, "max_tokens", f"must be > 0, got {self.max_tokens}"),
            (all(self.stop), "stop", "must not contain an empty string"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise RequestInvalid(f"sampling.{name}", message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One checked prompt: prefix_ids, then embeds (if any), then token_ids."""

    token_ids: tuple[int, ...]
    sampling: Sampling
    embeds: np.ndarray | None = None  # float32 [T, hidden_size]
    allowed: range | None = None  # speech-token ids; end-of-sequence stays allowed too
    prefix_ids: tuple[int, ...] = ()  # before embeds (only with embeds): a chat template's head

    @property
    def prompt_len(self) -> int:
        return len(self.prefix_ids) + len(self.token_ids) + (0 if self.embeds is None else int(self.embeds.shape[0]))


@dataclass
class Completion:
    """One sampled completion, end-of-sequence excluded."""

    token_ids: list[int]
    text: str  # stop string and what follows it cut off
    logprobs: np.ndarray = field(repr=False)  # float32 [len(token_ids)]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)


class RolloutBackend(Protocol):
    """A loaded policy that samples batches of prompts and takes new weights."""

    name: str  # registry key, e.g. "transformers"
    model: str  # the model folder
    vocab_size: int  # ids are [0, vocab_size)
    hidden_size: int  # D of prompt embeddings
    max_model_len: int  # prompt plus completion, in tokens
    eos_token_ids: frozenset[int]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of text, without special tokens or chat template."""
        ...

    def generate(self, requests: list[GenerationRequest]) -> list[list[Completion]]:
        """n completions for each request, index-aligned with requests."""
        ...

    def load_full(self, path: Path) -> None:
        """Replace the parameters a safetensors file (or folder of them) names; drops any LoRA adapter."""
        ...

    def load_lora(self, path: Path, version: int) -> None:
        """Sample with the PEFT adapter folder at path from now on, replacing any earlier adapter."""
        ...

    def load_to_device(self) -> None:
        """Residency: put the weights on the compute device (or wake them)."""
        ...

    def offload(self, mode: str) -> None:
        """Residency: free the device ("offload" to CPU memory, "sleep" through the runtime)."""
        ...


BACKENDS: dict[str, Callable[[BackendOptions], RolloutBackend]] = {
    "transformers": ImportedOnUse("speechrl.services.rollout.backends.hf", "TransformersBackend"),
    "vllm": ImportedOnUse("speechrl.services.rollout.backends.vllm_backend", "VllmBackend"),
}


def eos_ids(model_path: str, tokenizer_eos: int | None) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's plus generation_config.json's (Qwen2 lists several)."""
    from transformers import GenerationConfig

    ids = set() if tokenizer_eos is None else {int(tokenizer_eos)}
    try:
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError(f"{model_path}: neither the tokenizer nor generation_config.json names an eos token")
    return frozenset(ids)


def safetensors_files(path: Path) -> list[Path]:
    """The files of a FULL update: one .safetensors file, or every .safetensors file in a folder."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise RequestInvalid("path", f"{path} is not a .safetensors file")
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise RequestInvalid("path", f"folder {path} has no .safetensors file")
    raise RequestInvalid("path", f"{path} does not exist on the server")


def check_full_update(files: list[Path], expected: dict[str, tuple[int, ...]]) -> list[str]:
    """The tensor names of files, after checking each against expected (name -> shape).

    Reads only the safetensors headers. Unknown names and wrong shapes raise RequestInvalid on
    "path" naming them, before any weight changes, so a bad update leaves the policy as it was.
    """
    from safetensors import safe_open

    names: list[str] = []
    unknown: list[str] = []
    mismatched: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shape = tuple(handle.get_slice(name).get_shape())
                    if name not in expected:
                        unknown.append(name)
                    elif shape != expected[name]:
                        mismatched.append(f"{name} {list(shape)} (model has {list(expected[name])})")
                    names.append(name)
        except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' SafetensorError for a bad header
            raise RequestInvalid("path", f"{file} is not a readable safetensors file: {exc}") from None
    if unknown:
        raise RequestInvalid("path", f"{len(unknown)} tensor name(s) the model does not have: {_some(unknown)}")
    if mismatched:
        raise RequestInvalid("path", f"{len(mismatched)} tensor(s) of the wrong shape: {_some(mismatched)}")
    if not names:
        raise RequestInvalid("path", "the safetensors file(s) hold no tensor")
    return names


def check_lora_folder(path: Path) -> dict:
    """The adapter_config.json of a PEFT LoRA folder, or RequestInvalid on "path"."""
    import json

    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise RequestInvalid("path", f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise RequestInvalid("path", f"{path} has no adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise RequestInvalid("path", f"{config_file} is not JSON: {exc}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise RequestInvalid("path", f"{config_file} has peft_type {config.get('peft_type')!r}, not LORA")
    return config


def _some(items: list[str], limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")
