"""Mandarin error rate over pinyin syllables: the metric of CosyVoice2's GRPO recipe.

The recipe (CosyVoice, examples/grpo/cosyvoice2/token2wav_asr_server.py) normalises both texts with
WeTextProcessing's Chinese text normaliser (numbers, dates and units spelled out in characters,
punctuation removed, erhua and interjections kept), lower-cases them, writes them in pinyin with
tone numbers (pypinyin's TONE3 style, tone sandhi applied, the neutral tone as 5) and takes jiwer's
WER over the syllables. A homophone (他 / 她) therefore costs nothing and a wrong tone costs one
syllable, which a per-character CER would count the other way round.

The normaliser here is `wetext`, WeTextProcessing's runtime: the same compiled grammars read with
kaldifst, instead of the 165 MB pynini wheel that WeTextProcessing needs to build them. Both are
optional dependencies (`pip install 'speechrl-client[chinese]'`), imported on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jiwer

from speechrl.rewards.wer import EmptyReference

MISSING = ("the pinyin error rate needs the packages pypinyin and wetext; "
           "install them with: pip install 'speechrl-client[chinese]'")


@dataclass(frozen=True)
class PinyinErrorRate:
    """The syllable error rate of one hypothesis against one reference, with the syllables compared."""

    wer: float
    hypothesis_pinyin: str
    reference_pinyin: str


@functools.cache
def _normalizer() -> Any:
    try:
        from wetext import Normalizer
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    # The recipe's options: ZhNormalizer(remove_erhua=False, remove_interjections=False, remove_puncts=True).
    return Normalizer(lang="zh", operator="tn", remove_erhua=False, remove_interjections=False, remove_puncts=True)


def to_pinyin(text: str) -> str:
    """Chinese text as the recipe compares it: normalised, lower-cased, tone-numbered pinyin.

    >>> to_pinyin("我有2个苹果。")  # doctest: +SKIP
    'wo3 you3 liang3 ge4 ping2 guo3'
    """
    try:
        from pypinyin import Style, lazy_pinyin
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    normalized = _normalizer().normalize(text).lower()
    return " ".join(lazy_pinyin(normalized, style=Style.TONE3, tone_sandhi=True, neutral_tone_with_five=True))


def pinyin_error_rate(hypothesis: str, reference: str) -> PinyinErrorRate:
    """jiwer's WER over the pinyin syllables of two Chinese texts (the recipe's `wer`).

    Raises EmptyReference when the reference has no syllables; an empty hypothesis has WER 1.
    """
    reference_pinyin, hypothesis_pinyin = to_pinyin(reference), to_pinyin(hypothesis)
    if not reference_pinyin.strip():
        raise EmptyReference(f"reference {reference!r} has no pinyin syllables after normalisation")
    return PinyinErrorRate(wer=float(jiwer.wer(reference_pinyin, hypothesis_pinyin)),
                           hypothesis_pinyin=hypothesis_pinyin, reference_pinyin=reference_pinyin)
