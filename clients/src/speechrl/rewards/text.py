"""Text normalisation applied to both hypothesis and reference before any error rate.

English uses Whisper's English normaliser (the `whisper-normalizer` package): lower case,
punctuation removed, spelled-out numbers to digits, contractions and British/American spellings
unified. Languages written without spaces (zh, ja, ko, th, ...) use Whisper's basic normaliser and
are then compared per character, as seed-tts-eval does for Chinese. Other languages use the basic
normaliser (lower case, punctuation and diacritics-safe symbol removal).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

# Languages scored per character: written without spaces between words.
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "ko", "th", "lo", "my", "km"})


def is_character_language(language: str) -> bool:
    """True when error rates for this ISO 639-1 code are computed per character."""
    return language.lower().split("-")[0] in CHARACTER_LANGUAGES


@functools.cache
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@functools.cache
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


# Whisper's English normaliser costs ~0.35 ms a sentence (dozens of regex passes), more than the
# WER itself, and a GRPO batch scores each reference G times (often the same hypothesis too).
# Inside `shared_normalization()` results are remembered, so a batch normalises each text once;
# the memo lives as long as the batch, so memory stays bounded without a global cache.
_MEMO: contextvars.ContextVar[dict[tuple[str, str], str] | None] = contextvars.ContextVar("normalization_memo",
                                                                                         default=None)


@contextlib.contextmanager
def shared_normalization() -> Iterator[None]:
    """Within the block, normalize_text computes each (text, language) once.

    >>> with shared_normalization():
    ...     normalize_text("Twenty-five!") == normalize_text("Twenty-five!")
    True
    """
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def normalize_text(text: str, language: str = "en") -> str:
    """Normalise text for scoring; character languages come back as space-separated characters.

    >>> normalize_text("Mr. Smith paid twenty-five dollars!")
    'mister smith paid $25'
    >>> normalize_text("你好，世界", "zh")
    '你 好 世 界'
    """
    memo = _MEMO.get()
    if memo is None:
        return _normalize(text, language)
    key = (text, language)
    if key not in memo:
        memo[key] = _normalize(text, language)
    return memo[key]


def _normalize(text: str, language: str) -> str:
    lang = (language or "en").lower().split("-")[0]
    if lang == "en":
        normalized = _english()(text)
    else:
        normalized = _basic()(text)
    if is_character_language(lang):
        return " ".join(ch for ch in normalized if not ch.isspace())
    return " ".join(normalized.split())
