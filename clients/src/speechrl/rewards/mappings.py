"""Named mappings from a metric to a reward. The metric is reported raw; the mapping is a choice.

WER mappings: "one_minus_wer" = clip(1 - wer, 0, 1) (the ASR paper's R1),
"one_minus_tanh_3wer" = clip(1 - tanh(3 * wer), 0, 1) (CosyVoice's GRPO recipe), "negative_wer" = -wer.
Similarity mappings: "cosine" = raw cosine in [-1, 1] (seed-tts-eval's SIM),
"shifted" = (cosine + 1) / 2 (wespeaker's convention), "clipped" = max(cosine, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


WER_MAPPINGS: dict[str, Callable[[float], float]] = {
    "one_minus_wer": lambda wer: _clip01(1.0 - wer),
    "one_minus_tanh_3wer": lambda wer: _clip01(1.0 - math.tanh(3.0 * wer)),
    "negative_wer": lambda wer: -wer,
}

SIMILARITY_MAPPINGS: dict[str, Callable[[float], float]] = {
    "cosine": lambda cos: cos,
    "shifted": lambda cos: (cos + 1.0) / 2.0,
    "clipped": lambda cos: max(cos, 0.0),
}


def wer_reward(wer: float, mapping: str = "one_minus_wer") -> float:
    """Reward of a WER under a named mapping.

    >>> wer_reward(0.5), round(wer_reward(0.5, "one_minus_tanh_3wer"), 4)
    (0.5, 0.0949)
    """
    try:
        return WER_MAPPINGS[mapping](wer)
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
