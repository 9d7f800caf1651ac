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
class WordAlignment:
    """The word alignment of one hypothesis against one reference, on normalised text."""

    wer: float
    counts: Counts
    chunks: list[jiwer.AlignmentChunk]
    """jiwer's alignment: runs of equal, substituted, inserted and deleted words."""
    normalized_hypothesis: str
    normalized_reference: str


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


def align_words(hypothesis: str, reference: str, language: str = "en") -> WordAlignment:
    """WER and word alignment of hypothesis against reference after normalisation (no CER: the
    rule rewards need only this, and the character alignment would cost as much again).

    Raises EmptyReference when the reference normalises to nothing. An empty hypothesis is
    allowed: every reference word is a deletion (WER 1).

    >>> a = align_words("the cat sat on a mat", "The cat sat on the mat.")
    >>> round(a.wer, 3), [chunk.type for chunk in a.chunks]
    (0.167, ['equal', 'substitute', 'equal'])
    """
    ref = normalize_text(reference, language)
    hyp = normalize_text(hypothesis, language)
    if not ref:
        raise EmptyReference(f"reference {reference!r} is empty after normalisation")
    words = jiwer.process_words(ref, hyp)
    return WordAlignment(wer=float(words.wer), counts=_counts(words), chunks=words.alignments[0],
                         normalized_hypothesis=hyp, normalized_reference=ref)


def error_rates(hypothesis: str, reference: str, language: str = "en") -> ErrorRates:
    """WER and CER of hypothesis against reference after normalisation.

    Raises EmptyReference when the reference normalises to nothing. An empty hypothesis is
    allowed: every reference word is a deletion (WER 1).

    >>> r = error_rates("the cat sat on a mat", "The cat sat on the mat.")
    >>> round(r.wer, 3), r.word_counts.substitutions
    (0.167, 1)
    """
    words = align_words(hypothesis, reference, language)
    ref, hyp = words.normalized_reference, words.normalized_hypothesis
    char_ref, char_hyp = (ref.replace(" ", ""), hyp.replace(" ", "")) if is_character_language(language) else (ref, hyp)
    chars = jiwer.process_characters(char_ref, char_hyp)
    return ErrorRates(wer=words.wer, cer=float(chars.cer), word_counts=words.counts,
                      char_counts=_counts(chars), normalized_hypothesis=hyp, normalized_reference=ref)
