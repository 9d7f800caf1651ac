"""Intelligibility engine: decode audio, transcribe a batch in one model call, score each item.

Plain logic over an AsrBackend; no gRPC. Every item ends as a score or its own ItemFailure, and
an item that fails before the model (bad audio, empty reference) never reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from speechrl.rewards import ErrorRates, error_rates, normalize_text, wer_reward
from speechrl.rewards.pinyin import pinyin_error_rate
from speechrl.rewards.wer import EmptyReference
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.intelligibility.backends import AsrBackend


@dataclass(frozen=True)
class IntelligibilityItem:
    """One utterance to transcribe and score against its reference."""

    audio: AudioInput
    reference: str
    language: str = "en"  # ISO 639-1; picks the normaliser and the model's language token
    mapping: str = "one_minus_wer"  # a key of speechrl.rewards.WER_MAPPINGS
    unit: str = "word"  # what the rewarded error rate counts: word, character or pinyin


@dataclass(frozen=True)
class IntelligibilityResult:
    """Transcript, error rates and reward of one utterance."""

    transcript: str
    rates: ErrorRates
    reward: float
    mapping: str
    audio_seconds: float
    error_rate: float
    """What reward came from: rates.wer, rates.cer or the pinyin syllable WER, as unit says."""
    unit: str


class IntelligibilityEngine:
    """Scores batches of utterances with one ASR backend.

    >>> from speechrl.services.intelligibility.backends import BackendOptions, load_backend
    >>> engine = IntelligibilityEngine(load_backend("faster-whisper", BackendOptions()))  # doctest: +SKIP
    >>> engine.score_batch([IntelligibilityItem(AudioInput(encoded=wav), "the cat sat")])  # doctest: +SKIP
    [IntelligibilityResult(transcript='The cat sat.', ...)]
    """

    def __init__(self, backend: AsrBackend, max_audio_seconds: float = 60.0, max_text_chars: int = 20_000):
        self.backend = backend
        self.max_audio_seconds = max_audio_seconds
        self.max_text_chars = max_text_chars

    def warm_up(self, language: str = "en") -> None:
        """Run one short utterance through the model so the first request pays no first-call costs."""
        rate = self.backend.sample_rate
        t = np.arange(rate, dtype=np.float32) / rate
        # Any second of audio runs the encoder and some decoder steps, which is where the first
        # call's one-off costs (allocator growth, kernel selection, lazy init) are paid.
        self.backend.transcribe([0.05 * np.sin(2 * np.pi * 220.0 * t).astype(np.float32)], [language])

    def score_batch(self, items: list[IntelligibilityItem]) -> list[IntelligibilityResult | ItemFailure]:
        """Score every item; a bad item gets an ItemFailure and the others are unaffected.

        The reference's normalisation, done for the emptiness check, is remembered for the WER (text.py).
        """
        outcomes: list[IntelligibilityResult | ItemFailure | None] = [None] * len(items)
        ready: list[tuple[int, np.ndarray]] = []
        for index, item in enumerate(items):
            prepared = self._prepare(item)
            if isinstance(prepared, ItemFailure):
                outcomes[index] = prepared
            else:
                ready.append((index, prepared))
        if ready:
            transcripts = self.backend.transcribe([audio for _, audio in ready],
                                                  [items[index].language for index, _ in ready])
            for (index, audio), transcript in zip(ready, transcripts, strict=True):
                outcomes[index] = self._score(items[index], transcript, audio.shape[0] / self.backend.sample_rate)
        return [outcome for outcome in outcomes if outcome is not None]

    def _prepare(self, item: IntelligibilityItem) -> np.ndarray | ItemFailure:
        if len(item.reference) > self.max_text_chars:
            return ItemFailure(ErrorCode.TEXT_TOO_LONG, f"reference_text has {len(item.reference)} characters, over "
                               f"the server's max_text_chars of {self.max_text_chars}", "reference_text")
        if not item.reference.strip():
            return ItemFailure(ErrorCode.EMPTY_TEXT, "reference_text is empty", "reference_text")
        if not normalize_text(item.reference, item.language):
            # Checked before the model runs: such an item could never be scored.
            return ItemFailure(ErrorCode.EMPTY_TEXT, f"reference_text {item.reference!r} is empty after normalisation",
                               "reference_text")
        try:
            return decode_audio(item.audio, self.backend.sample_rate, self.max_audio_seconds)
        except ItemFailure as failure:
            return failure.at("audio")

    def _score(self, item: IntelligibilityItem, transcript: str, seconds: float) -> IntelligibilityResult | ItemFailure:
        try:
            rates = error_rates(transcript, item.reference, item.language)
            if item.unit == "pinyin":
                error_rate = pinyin_error_rate(transcript, item.reference).wer
            else:
                error_rate = rates.cer if item.unit == "character" else rates.wer
        except EmptyReference as exc:
            return ItemFailure(ErrorCode.EMPTY_TEXT, str(exc), "reference_text")
        return IntelligibilityResult(transcript=transcript, rates=rates, reward=wer_reward(error_rate, item.mapping),
                                     mapping=item.mapping, audio_seconds=seconds, error_rate=error_rate, unit=item.unit)
