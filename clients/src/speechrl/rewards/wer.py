"""Word and character error rates with jiwer 4, on normalised text.

For character languages (see text.py) the "words" are characters, so `wer` is the per-character
rate that seed-tts-eval reports as WER for Chinese.
"""

from __future__ import annotations

from dataclasses import dataclass

import jiwer

from speechrl.rewards.text import is_character_language, normalize_text


@dataclass(frozen=True)
class Counts:
    """jiwer alignment counts."""

    hits: int
    substitutions: int
    insertions: int
    deletions: int


@dataclass(frozen=True)
class ErrorRates:
    """Error rates of one hypothesis against one reference."""

    wer: float
    cer: float
    word_counts: Counts
    char_counts: Counts
    normalized_hypothesis: str
    normalized_reference: str


class EmptyReference(ValueError):
    """The reference has no words after normalisation, so no error rate exists."""


def _counts(output: jiwer.WordOutput | jiwer.CharacterOutput) -> Counts:
    return Counts(output.hits, output.substitutions, output.insertions, output.deletions)


def error_rates(hypothesis: str, reference: str, language: str = "en") -> ErrorRates:
    """WER and CER of hypothesis against reference after normalisation.

    Raises EmptyReference when the reference normalises to nothing. An empty hypothesis is
    allowed: every reference word is a deletion (WER 1).

    >>> r = error_rates("the cat sat on a mat", "The cat sat on the mat.")
    >>> round(r.wer, 3), r.word_counts.substitutions
    (0.167, 1)
    """
    ref = normalize_text(reference, language)
    hyp = normalize_text(hypothesis, language)
    if not ref:
        raise EmptyReference(f"reference {reference!r} is empty after normalisation")
    words = jiwer.process_words(ref, hyp)
    char_ref, char_hyp = (ref.replace(" ", ""), hyp.replace(" ", "")) if is_character_language(language) else (ref, hyp)
    chars = jiwer.process_characters(char_ref, char_hyp)
    return ErrorRates(wer=float(words.wer), cer=float(chars.cer), word_counts=_counts(words),
                      char_counts=_counts(chars), normalized_hypothesis=hyp, normalized_reference=ref)
