"""token2wav engines: validate each item, run the batch through one model, answer per item. No gRPC.

Token2WavEngine renders speech tokens as audio; TokenScorer scores (tokens, text) pairs with a
Token2Reward (DiffRO's token-input ASR), a reward without rendering any audio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.token2wav.backends import SynthesisItem, Token2WavBackend, Waveform
from speechrl.services.token2wav.token2reward import IMPOSSIBLE, Token2Reward, encode_text, pad


class Token2WavEngine:
    """Renders batches of speech-token sequences; every item ends as a Waveform or its own ItemFailure.

    >>> from speechrl.services.token2wav.backends import BackendOptions, load_backend
    >>> engine = Token2WavEngine(load_backend("espeak-phonemes", BackendOptions()))
    >>> wave = engine.synthesize_batch([SynthesisItem(engine.backend.vocabulary.text_to_ids("hello"))])[0]
    >>> wave.sample_rate_hertz
    22050
    """

    def __init__(self, backend: Token2WavBackend, max_tokens: int = 4096):
        self.backend = backend
        self.max_tokens = max_tokens

    def synthesize_batch(self, items: Sequence[SynthesisItem]) -> list[Waveform | ItemFailure]:
        results: list[Waveform | ItemFailure | None] = [self._check(item) for item in items]
        todo = [i for i, r in enumerate(results) if r is None]
        rendered = self.backend.synthesize([items[i] for i in todo]) if todo else []
        for i, out in zip(todo, rendered, strict=True):
            results[i] = out if isinstance(out, Waveform) else self._failure(out)
        return [r for r in results if r is not None]

    def _check(self, item: SynthesisItem) -> ItemFailure | None:
        if not item.tokens:
            return ItemFailure(ErrorCode.EMPTY_TEXT, "no speech tokens", "tokens")
        if len(item.tokens) > self.max_tokens:
            return ItemFailure(ErrorCode.TEXT_TOO_LONG, f"{len(item.tokens)} tokens, more than {self.max_tokens}",
                               "tokens")
        bad = [t for t in item.tokens if not 0 <= t < self.backend.num_tokens]
        if bad:
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"token ids {bad[:5]} outside 0..{self.backend.num_tokens - 1}",
                               "tokens")
        return None

    @staticmethod
    def _failure(error: Exception) -> ItemFailure:
        if isinstance(error, ItemFailure):  # the backend already says what is wrong and where
            return error
        if isinstance(error, LookupError):
            return ItemFailure(ErrorCode.UNKNOWN_SPEAKER, str(error), "speaker")
        if isinstance(error, ValueError):
            return ItemFailure(ErrorCode.EMPTY_TEXT, str(error), "tokens")
        return ItemFailure(ErrorCode.INTERNAL, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class TokenTextItem:
    """One pair to score: 0-based speech-token ids and the text they should say."""

    tokens: Sequence[int]
    text: str


@dataclass(frozen=True)
class TokenScore:
    """log P(text | tokens) of one pair (see token2wav.proto's TokenScore)."""

    log_prob: float  # nats, <= 0; the model's fixed penalty (-IMPOSSIBLE) when not alignable
    num_chars: int  # characters of the text the model scores
    alignable: bool  # False: too few tokens to spell the text

    @property
    def reward(self) -> float:
        """exp(log_prob / num_chars): the geometric-mean per-character probability in [0, 1]; 0 if not alignable."""
        return math.exp(self.log_prob / self.num_chars) if self.alignable else 0.0


class TokenScorer:
    """Scores batches of (tokens, text) with a Token2Reward; every item ends as a TokenScore or an ItemFailure.

    >>> from speechrl.services.token2wav.token2reward import Token2RewardConfig
    >>> scorer = TokenScorer(Token2Reward(Token2RewardConfig(num_tokens=4, d_model=8, layers=1, heads=1)).eval())
    >>> [type(r).__name__ for r in scorer.score_batch([TokenTextItem([1, 2], "a"), TokenTextItem([], "a"),
    ...                                                 TokenTextItem([9], "a")])]
    ['TokenScore', 'TokenScore', 'ItemFailure']
    """

    def __init__(self, model: Token2Reward):
        self.model = model.eval().requires_grad_(False)

    def modules(self) -> list[torch.nn.Module]:
        """What moves with the GPU lease."""
        return [self.model]

    def score_batch(self, items: Sequence[TokenTextItem]) -> list[TokenScore | ItemFailure]:
        results: list[TokenScore | ItemFailure | None] = [self._check(item) for item in items]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            device = next(self.model.parameters()).device
            tokens, mask = pad([items[i].tokens for i in todo])  # [B, T] each
            with torch.no_grad():
                log_probs = self.model.log_prob_text(tokens.to(device), mask.to(device),
                                                     [items[i].text for i in todo]).tolist()  # B
            for i, log_prob in zip(todo, log_probs, strict=True):
                results[i] = TokenScore(log_prob, len(encode_text(items[i].text)), alignable=log_prob > -IMPOSSIBLE)
        return [r for r in results if r is not None]

    def _check(self, item: TokenTextItem) -> ItemFailure | None:
        if not encode_text(item.text):
            return ItemFailure(ErrorCode.EMPTY_TEXT, "the text has no letter, space or apostrophe to score", "text")
        if len(item.tokens) > self.model.config.max_tokens:
            return ItemFailure(ErrorCode.TEXT_TOO_LONG, f"{len(item.tokens)} tokens, more than the model's "
                                                        f"{self.model.config.max_tokens}", "tokens")
        bad = [t for t in item.tokens if not 0 <= t < self.model.config.num_tokens]
        if bad:
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"token ids {bad[:5]} outside 0..{self.model.config.num_tokens - 1}",
                               "tokens")
        return None
