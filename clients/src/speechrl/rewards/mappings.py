"""Named mappings from a metric to a reward. The metric is reported raw; the mapping is a choice.

WER mappings: "one_minus_wer" = clip(1 - wer, floor, 1) (the ASR paper's R1, floor 0),
"one_minus_tanh_3wer" = clip(1 - tanh(3 * wer), floor, 1) (CosyVoice's GRPO recipe), "negative_wer" = -wer.
The floor of the bounded ones is 0 unless asked: at 0 every hypothesis with WER >= 1 scores alike,
which hides how far a long hallucination runs on; a negative floor (e.g. -1) keeps a WER-2 loop below
a WER-1 miss (1 - tanh never goes below 0, so only one_minus_wer reaches a negative floor).
Similarity mappings: "cosine" = raw cosine in [-1, 1] (seed-tts-eval's SIM),
"shifted" = (cosine + 1) / 2 (wespeaker's convention), "clipped" = max(cosine, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

WER_MAPPINGS: dict[str, Callable[[float, float], float]] = {  # (wer, floor) -> reward
    "one_minus_wer": lambda wer, floor: min(1.0, max(floor, 1.0 - wer)),
    "one_minus_tanh_3wer": lambda wer, floor: min(1.0, max(floor, 1.0 - math.tanh(3.0 * wer))),
    "negative_wer": lambda wer, floor: -wer,
}

SIMILARITY_MAPPINGS: dict[str, Callable[[float], float]] = {
    "cosine": lambda cos: cos,
    "shifted": lambda cos: (cos + 1.0) / 2.0,
    "clipped": lambda cos: max(cos, 0.0),
}


def wer_reward(wer: float, mapping: str = "one_minus_wer", floor: float = 0.0) -> float:
    """Reward of a WER under a named mapping; floor is the bounded mappings' lowest reward.

    >>> wer_reward(0.5), round(wer_reward(0.5, "one_minus_tanh_3wer"), 4), wer_reward(2.5), wer_reward(2.5, floor=-1)
    (0.5, 0.0949, 0.0, -1.0)
    """
    if not floor <= 0.0:
        raise ValueError(f"floor must be <= 0 (a floor above 0 would reward a wrong transcript), got {floor}")
    try:
        return float(WER_MAPPINGS[mapping](wer, floor))
    except KeyError:
        raise ValueError(f"unknown WER reward mapping {mapping!r}; choose one of {sorted(WER_MAPPINGS)}") from None


def similarity_reward(cosine: float, mapping: str = "cosine") -> float:
    """Reward of a cosine similarity under a named mapping.

    >>> similarity_reward(0.6, "shifted")
    0.8
    """
    try:
        return SIMILARITY_MAPPINGS[mapping](cosine)
    except KeyError:
        raise ValueError(f"unknown similarity mapping {mapping!r}; choose one of {sorted(SIMILARITY_MAPPINGS)}") from None
