"""Rollout engine: checks prompts, samples them through a backend, and versions the policy.

Batch first: generate_batch takes prompts of any number of requests (the DynamicBatcher mixes
them) and answers one entry per prompt: its n samples, or an ItemFailure. Weight updates go
through the same lock as sampling, so a batch never runs on half-loaded weights and every sample
carries the version that really produced it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from speechrl.services.errors import ErrorCode, ItemFailure, RequestInvalid, StaleFence
from speechrl.services.rollout.backends import GenerationRequest, RolloutBackend, Sampling

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("full", "lora")


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the request gave it: exactly one of text, token_ids, embeddings."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    embeddings: np.ndarray | None = field(default=None, repr=False)  # [T, D] float32
    suffix_token_ids: tuple[int, ...] = ()  # after the embeddings
    prefix_token_ids: tuple[int, ...] = ()  # before the embeddings


@dataclass(frozen=True)
class GenerateItem:
    """One prompt with its request's settings."""

    prompt: PromptInput
    sampling: Sampling
    speech_range: range | None = None  # set in SPEECH_TOKENS mode


@dataclass
class SampleResult:
    """One completion of a prompt, stamped with the policy version that produced it."""

    token_ids: list[int]
    text: str  # empty in SPEECH_TOKENS mode
    logprobs: np.ndarray = field(repr=False)  # float32 [len(token_ids)]
    finish_reason: str  # "stop" or "length"
    policy_version: int


class RolloutEngine:
    """Samples prompts with a backend; takes new weights with increasing versions.

    >>> engine = RolloutEngine(backend, max_samples_per_prompt=64)  # doctest: +SKIP
    >>> engine.generate_batch([GenerateItem(PromptInput(text="hello"), Sampling(n=4, max_tokens=16))])  # doctest: +SKIP
    """

    def __init__(self, backend: RolloutBackend, max_samples_per_prompt: int = 64, initial_version: int = 0):
        self.backend = backend
        self.max_samples_per_prompt = max_samples_per_prompt
        self._version = initial_version
        self._fence = 0  # the fencing token of the last accepted weight push
        self._lock = threading.Lock()  # the model is not re-entrant: sampling and loading take turns

    @property
    def version(self) -> int:
        """The policy version now sampling."""
        return self._version

    def check_request(self, sampling: Sampling, speech_range: range | None) -> None:
        """Refuse request-wide settings the model cannot honour (RequestInvalid naming the field)."""
        if sampling.n > self.max_samples_per_prompt:
            raise RequestInvalid("sampling.n", f"{sampling.n} is over the server's limit of "
                                               f"{self.max_samples_per_prompt} samples per prompt")
        if sampling.max_tokens >= self.backend.max_model_len:
            raise RequestInvalid("sampling.max_tokens", f"{sampling.max_tokens} leaves no room for a prompt in the "
                                                        f"model's {self.backend.max_model_len} positions")
        if speech_range is not None:
            vocab = self.backend.vocab_size
            if not 0 <= speech_range.start < speech_range.stop <= vocab:
                raise RequestInvalid("speech_token_range", f"[{speech_range.start}, {speech_range.stop}) must be a "
                                                           f"non-empty range within the vocabulary [0, {vocab})")

    def generate_batch(self, items: list[GenerateItem]) -> list[list[SampleResult] | ItemFailure]:
        """n samples per item, or the item's ItemFailure; bad items never reach the model."""
        prepared = [self._prepare(item) for item in items]
        requests = [p for p in prepared if isinstance(p, GenerationRequest)]
        with self._lock:
            version = self._version
            completions = iter(self.backend.generate(requests) if requests else [])
        results: list[list[SampleResult] | ItemFailure] = []
        for item, request in zip(items, prepared, strict=True):
            if isinstance(request, ItemFailure):
                results.append(request)
                continue
            speech = item.speech_range is not None
            results.append([SampleResult(c.token_ids, "" if speech else c.text, c.logprobs, c.finish_reason, version)
                            for c in next(completions)])
        return results

    def update_weights(self, version: int, path: str, weights_format: str, fence: int = 0) -> int:
        """Load new weights and make version current; RequestInvalid (naming the field) leaves the policy as it was.

        fence: the pusher's GPU-lease fencing token; lower than the last accepted push's is StaleFence, so a
        trainer whose lease lapsed cannot overwrite a newer policy (0: the pusher holds no lease; not checked).
        """
        if weights_format not in WEIGHT_FORMATS:
            raise RequestInvalid("format", f"must be one of {WEIGHT_FORMATS}, got {weights_format!r}")
        if not path:
            raise RequestInvalid("path", "is required: a safetensors file (FULL) or a PEFT adapter folder (LORA)")
        with self._lock:
            if fence and fence < self._fence:
                raise StaleFence("weight push", fence, self._fence)
            if version <= self._version:
                raise RequestInvalid("version", f"{version} is not greater than the current policy version "
                                                f"{self._version}; versions must increase")
            if weights_format == "full":
                self.backend.load_full(Path(path))
            else:
                self.backend.load_lora(Path(path), version)
            self._version = version
            self._fence = max(self._fence, fence)
        log.info("policy version %d loaded from %s (%s)", version, path, weights_format)
        return version

    def _prepare(self, item: GenerateItem) -> GenerationRequest | ItemFailure:
        """The backend request of a prompt, or why it cannot be sampled."""
        prompt = item.prompt
        embeds = None
        prefix: tuple[int, ...] = ()
        if prompt.embeddings is not None:
            failure = self._check_embeddings(prompt.embeddings)
            if failure is not None:
                return failure
            embeds = np.asarray(prompt.embeddings, dtype=np.float32)
            prefix = prompt.prefix_token_ids
            bad = [i for i in prefix if not 0 <= i < self.backend.vocab_size]
            if bad:
                return ItemFailure(ErrorCode.INVALID_TENSOR, f"token ids {bad[:8]} are outside the vocabulary "
                                                             f"[0, {self.backend.vocab_size})", "prefix_token_ids")
            ids, ids_field = prompt.suffix_token_ids, "suffix_token_ids"
        elif prompt.token_ids is not None:
            ids, ids_field = prompt.token_ids, "token_ids.ids"
            if not ids:
                return ItemFailure(ErrorCode.EMPTY_TEXT, "the prompt has no token ids", "token_ids.ids")
        elif prompt.text is not None and prompt.text.strip():
            ids, ids_field = tuple(self.backend.tokenize(prompt.text)), "text"
            if not ids:
                return ItemFailure(ErrorCode.EMPTY_TEXT, "the text tokenizes to no tokens", "text")
        else:
            return ItemFailure(ErrorCode.EMPTY_TEXT, "the prompt is empty: set text, token_ids or embeddings", "content")
        bad = [i for i in ids if not 0 <= i < self.backend.vocab_size]
        if bad:
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"token ids {bad[:8]} are outside the vocabulary "
                                                         f"[0, {self.backend.vocab_size})", ids_field)
        request = GenerationRequest(tuple(int(i) for i in ids), item.sampling, embeds, item.speech_range,
                                    prefix_ids=tuple(int(i) for i in prefix) if embeds is not None else ())
        room = self.backend.max_model_len - item.sampling.max_tokens
        if request.prompt_len > room:
            return ItemFailure(ErrorCode.TEXT_TOO_LONG, f"the prompt has {request.prompt_len} positions; with max_tokens "
                                                        f"{item.sampling.max_tokens} the model's "
                                                        f"{self.backend.max_model_len} allow {room}", "")
        return request

    def _check_embeddings(self, embeddings: np.ndarray) -> ItemFailure | None:
        width = self.backend.hidden_size
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"embeddings must be [T, {width}] with T > 0, got shape "
                                                         f"{list(embeddings.shape)}", "embeddings")
        if embeddings.shape[1] != width:
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"embeddings have width {embeddings.shape[1]}, the policy's "
                                                         f"hidden size is {width}", "embeddings")
        if not np.isfinite(embeddings).all():
            return ItemFailure(ErrorCode.INVALID_TENSOR, "embeddings contain NaN or infinite values", "embeddings")
        return None
