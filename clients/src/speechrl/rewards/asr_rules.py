"""The ASR GRPO rewards of arXiv 2509.18569, computed from text alone.

R1 = clip(1 - WER, 0, 1): accuracy (another mapping or a negative floor by RuleRewardConfig).
R2 = -1 when the hypothesis hallucinates, else 0. Rules (each reported by name when it fires):
  - "repeated_ngram": content said again that the audio said once (looping decoders): a short
    n-gram (fewer than phrase_words words) said repeat_threshold times or more in a row, a phrase
    of phrase_words to max_ngram words said twice or more in a row, or any phrase_words-gram that
    occurs more often in the hypothesis than in the reference and at least twice (a sentence
    repeated later in a long-form transcript);
  - "insertion_burst": at least insertion_burst consecutive inserted words in the alignment
    (content that is not in the audio);
  - "too_long": more than length_ratio * reference words + length_slack words;
  - "script_mismatch": the hypothesis's letters are mostly of another script than the
    reference's (a translation instead of a transcription, e.g. English for Chinese audio).
R3 = (keyword precision + keyword recall) / 2 over the given keywords, matched as whole normalised
  words or phrases: precision = keywords in both / keywords in the hypothesis (1 if none),
  recall = keywords in both / keywords in the reference (1 if none).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import jiwer

from speechrl.rewards.mappings import WER_MAPPINGS, wer_reward
from speechrl.rewards.text import is_character_language, normalize_text
from speechrl.rewards.wer import Counts, WordAlignment, align_words


@dataclass(frozen=True)
class RuleRewardConfig:
    """Weights of the total and thresholds of the hallucination rules."""

    accuracy_weight: float = 1.0
    """Weight of R1 in the total."""
    hallucination_weight: float = 1.0
    """Weight of R2 in the total."""
    keyword_weight: float = 0.0
    """Weight of R3 in the total; 0 unless the data set carries keywords."""
    accuracy_mapping: str = "one_minus_wer"
    """How WER becomes R1: a name of speechrl.rewards.WER_MAPPINGS; the paper's is one_minus_wer."""
    accuracy_floor: float = 0.0
    """Lowest R1 (<= 0). The paper's clip at 0 scores every hypothesis with WER >= 1 alike, a long
    loop as a plain miss; a negative floor (e.g. -1) lets R1 rank them too."""
    repeat_threshold: int = 4
    """Back-to-back copies of a short n-gram (fewer than phrase_words words) that count as a loop."""
    phrase_words: int = 4
    """A phrase this long or longer said twice in a row counts as a loop."""
    max_ngram: int = 16
    """Longest phrase checked for loops (a repeated sentence of a long-form decode)."""
    insertion_burst: int = 5
    """Consecutive inserted words that count as invented content."""
    length_ratio: float = 1.5
    """A hypothesis longer than length_ratio * reference words + length_slack hallucinates."""
    length_slack: int = 3
    """Extra words allowed on top of length_ratio, so short references are not over-penalised."""

    def __post_init__(self) -> None:
        if self.repeat_threshold < 2:
            raise ValueError(f"repeat_threshold must be >= 2, got {self.repeat_threshold}")
        if self.max_ngram < 1 or self.insertion_burst < 1 or self.phrase_words < 2:
            raise ValueError("max_ngram and insertion_burst must be >= 1, phrase_words >= 2")
        if self.length_ratio <= 1.0:
            raise ValueError(f"length_ratio must be > 1, got {self.length_ratio}")
        if self.accuracy_mapping not in WER_MAPPINGS:
            raise ValueError(f"accuracy_mapping must be one of {sorted(WER_MAPPINGS)}, got {self.accuracy_mapping!r}")
        if not -10.0 <= self.accuracy_floor <= 0.0:
            raise ValueError(f"accuracy_floor must be in [-10, 0] (0: the paper's clip), got {self.accuracy_floor}")


@dataclass(frozen=True)
class RuleRewardResult:
    """Every component of the rule rewards for one hypothesis."""

    wer: float
    word_counts: Counts
    accuracy_reward: float
    hallucination_reward: float
    hallucination_reasons: list[str] = field(default_factory=list)
    keyword_precision: float = 1.0
    keyword_recall: float = 1.0
    keyword_reward: float = 1.0
    total: float = 0.0


def looped_words(words: Sequence[str], config: RuleRewardConfig) -> int:
    """Words spent looping: the largest (copies - 1) * n over back-to-back repeats that count as a
    loop (see the module docstring), 0 when there is none.

    >>> config = RuleRewardConfig()
    >>> looped_words("go go go go home".split(), config), looped_words("go go home".split(), config)
    (3, 0)
    >>> looped_words("the red box is here the red box is here".split(), config)
    5
    """
    best = 0
    for n in range(1, min(config.max_ngram, len(words) // 2) + 1):
        needed = 2 if n >= config.phrase_words else config.repeat_threshold
        for start in range(0, len(words) - n):
            copies, pos = 1, start + n
            while pos + n <= len(words) and words[pos:pos + n] == words[start:start + n]:
                copies += 1
                pos += n
            if copies >= needed:
                best = max(best, (copies - 1) * n)
    return best


def excess_repeats(hyp_words: Sequence[str], ref_words: Sequence[str], n: int) -> int:
    """Extra occurrences of n-grams the hypothesis repeats (at least twice) beyond the reference's count.

    >>> excess_repeats("a b c d x a b c d".split(), "a b c d x y z".split(), 4)
    1
    """
    def grams(words: Sequence[str]) -> Counter[tuple[str, ...]]:
        return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

    hyp, ref = grams(hyp_words), grams(ref_words)
    return sum(count - ref[g] for g, count in hyp.items() if count >= 2 and count > ref[g])


def longest_insertion_run(chunks: Sequence[jiwer.AlignmentChunk]) -> int:
    """Length of the longest run of inserted words in a jiwer alignment."""
    return max((c.hyp_end_idx - c.hyp_start_idx for c in chunks if c.type == "insert"), default=0)


def dominant_script(text: str) -> str | None:
    """The Unicode script most of text's letters belong to (Han and kana count as one), or None."""
    if text.isascii():  # ASCII letters are all Latin; spares a Unicode name lookup per character
        return "LATIN" if sum(ch.isalpha() for ch in text) >= 3 else None
    scripts: Counter[str] = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "UNKNOWN").split()[0]
            scripts["CJK" if name in ("CJK", "HIRAGANA", "KATAKANA") else name] += 1
    if sum(scripts.values()) < 3:
        return None
    return scripts.most_common(1)[0][0]


def hallucination_reasons(words: WordAlignment, raw_hyp: str, raw_ref: str, config: RuleRewardConfig) -> list[str]:
    """Names of the hallucination rules that fire for a hypothesis, given its word alignment to the
    reference (normalised texts) and both raw texts (for the script)."""
    hyp_words, ref_words = words.normalized_hypothesis.split(), words.normalized_reference.split()
    reasons = []
    if looped_words(hyp_words, config) > looped_words(ref_words, config) or \
            excess_repeats(hyp_words, ref_words, config.phrase_words) > 0:
        reasons.append("repeated_ngram")
    if longest_insertion_run(words.chunks) >= config.insertion_burst:
        reasons.append("insertion_burst")
    if len(hyp_words) > config.length_ratio * len(ref_words) + config.length_slack:
        reasons.append("too_long")
    hyp_script, ref_script = dominant_script(raw_hyp), dominant_script(raw_ref)
    if hyp_script and ref_script and hyp_script != ref_script:
        reasons.append("script_mismatch")
    return reasons


def keyword_scores(hyp: str, ref: str, keywords: Sequence[str], language: str) -> tuple[float, float]:
    """(precision, recall) of keywords, matched on normalised text."""
    def contains(text: str, phrase: str) -> bool:
        if is_character_language(language):
            return phrase.replace(" ", "") in text.replace(" ", "")
        return f" {phrase} " in f" {text} "

    normalized = {normalize_text(k, language) for k in keywords} - {""}
    in_hyp = {k for k in normalized if contains(hyp, k)}
    in_ref = {k for k in normalized if contains(ref, k)}
    both = len(in_hyp & in_ref)
    precision = both / len(in_hyp) if in_hyp else 1.0
    recall = both / len(in_ref) if in_ref else 1.0
    return precision, recall


def rule_rewards(hypothesis: str, reference: str, keywords: Sequence[str] = (), language: str = "en",
                 config: RuleRewardConfig | None = None) -> RuleRewardResult:
    """R1, R2, R3 and their weighted total for one hypothesis.

    Raises wer.EmptyReference when the reference normalises to nothing.

    >>> r = rule_rewards("turn on the kitchen light", "Turn on the kitchen lights", keywords=["kitchen"])
    >>> r.accuracy_reward, r.hallucination_reward, r.keyword_reward
    (0.8, 0.0, 1.0)
    """
    config = config or RuleRewardConfig()
    words = align_words(hypothesis, reference, language)
    accuracy = wer_reward(words.wer, config.accuracy_mapping, config.accuracy_floor)
    reasons = hallucination_reasons(words, hypothesis, reference, config)
    hallucination = -1.0 if reasons else 0.0
    precision, recall = keyword_scores(words.normalized_hypothesis, words.normalized_reference, keywords, language)
    keyword = (precision + recall) / 2.0
    total = (config.accuracy_weight * accuracy + config.hallucination_weight * hallucination
             + config.keyword_weight * keyword)
    return RuleRewardResult(wer=words.wer, word_counts=words.counts, accuracy_reward=accuracy,
                            hallucination_reward=hallucination, hallucination_reasons=reasons,
                            keyword_precision=precision, keyword_recall=recall, keyword_reward=keyword,
                            total=total)
