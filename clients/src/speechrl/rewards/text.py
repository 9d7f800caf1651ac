"""Text normalisation applied to both hypothesis and reference before any error rate.

English uses Whisper's English normaliser (the `whisper-normalizer` package): lower case,
punctuation removed, spelled-out numbers to digits, contractions and British/American spellings
unified. Languages written without spaces (zh, ja, ko, th, ...) use Whisper's basic normaliser and
are then compared per character, as seed-tts-eval does for Chinese. Other languages use the basic
normaliser (lower case, punctuation and diacritics-safe symbol removal).
"""

from __future__ import annotations

import functools

from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

# Languages scored per character: written without spaces between words.
CHARACTER_LANGUAGES = frozenset({"zh", "yue", "ja", "ko", "th", "lo", "my", "km"})

# Whisper's English normaliser costs ~0.3 ms a sentence (dozens of regex passes), more than the WER
# itself, and RL scores each reference many times: G samples per group, once per epoch, and once
# per request when a trainer sends one sample per call. So normalised texts are remembered, process
# wide, in an LRU of NORMALIZED_CACHE_SIZE entries; texts longer than CACHED_TEXT_CHARS (long-form
# transcripts, rarely repeated) are not, which bounds the cache at a few tens of MB.
NORMALIZED_CACHE_SIZE = 8192
CACHED_TEXT_CHARS = 2000


def is_character_language(language: str) -> bool:
    """True when error rates for this ISO 639-1 code are computed per character."""
    return language.lower().split("-")[0] in CHARACTER_LANGUAGES


@functools.cache
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@functools.cache
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def normalize_text(text: str, language: str = "en") -> str:
    """Normalise text for scoring; character languages come back as space-separated characters.

    >>> normalize_text("Mr. Smith paid twenty-five dollars!")
    'mister smith paid $25'
    >>> normalize_text("你好，世界", "zh")
    '你 好 世 界'
    """
    if len(text) <= CACHED_TEXT_CHARS:
        return _normalize_remembered(text, language)
    return _normalize(text, language)


def _normalize(text: str, language: str) -> str:
    lang = (language or "en").lower().split("-")[0]
    if lang == "en":
        normalized = _english()(text)
    else:
        normalized = _basic()(text)
    if is_character_language(lang):
        return " ".join(ch for ch in normalized if not ch.isspace())
    return " ".join(normalized.split())


_normalize_remembered = functools.lru_cache(maxsize=NORMALIZED_CACHE_SIZE)(_normalize)
