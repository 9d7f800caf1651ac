"""token2wav engine: validate each item, render the batch with one backend, answer per item. No gRPC."""

from __future__ import annotations

from collections.abc import Sequence

from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.token2wav.backends import SynthesisItem, Token2WavBackend, Waveform


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
        if isinstance(error, LookupError):
            return ItemFailure(ErrorCode.UNKNOWN_SPEAKER, str(error), "speaker")
        if isinstance(error, ValueError):
            return ItemFailure(ErrorCode.EMPTY_TEXT, str(error), "tokens")
        return ItemFailure(ErrorCode.INTERNAL, f"{type(error).__name__}: {error}")
