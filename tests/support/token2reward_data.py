"""A made-up "phoneme" code for tiny Token2Reward models: every word is a fixed token sequence a
little shorter than its spelling."""

from __future__ import annotations

WORDS = {"the": [1, 2], "cat": [3, 4, 5], "sat": [6, 4, 5], "on": [7, 8], "mat": [9, 4, 5], "dog": [10, 11, 12],
         "ran": [13, 4, 14]}
SENTENCES = ["the cat sat", "the dog ran", "the cat ran", "the dog sat on the mat", "cat on the mat", "dog sat"]


def tokens(text: str) -> list[int]:
    """The token ids of text, 0 between words like a pause."""
    return [t for word in text.split() for t in (*WORDS[word], 0)][:-1]
