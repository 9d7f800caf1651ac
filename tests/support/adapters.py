"""Helpers of the trainer-adapter tests: a stand-in token2wav.

The token2wav service does not exist yet (issue 7), so the TTS paths are tested with this stand-in:
a token sequence [k, ...] "decodes" to SENTENCES[k] spoken by espeak-ng, real speech that the real
intelligibility scorer transcribes. It is importable as "tests.support.adapters:token2wav", the
form a verl YAML config uses.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from speechrl.services.espeak import EspeakSynthesizer

SENTENCES = ("The quick brown fox jumps over the lazy dog.", "Please turn on the kitchen lights.",
             "Yesterday my neighbour painted the old wooden fence green.")


@cache
def _speech() -> EspeakSynthesizer:
    return EspeakSynthesizer(Path(tempfile.gettempdir()) / "speechrl-test-token2wav")


def speak(index: int) -> bytes:
    """WAV bytes of SENTENCES[index]."""
    return _speech().wav(SENTENCES[index % len(SENTENCES)])


def tokens_for(index: int, length: int = 5) -> list[int]:
    """A speech-token sequence that token2wav turns into SENTENCES[index]."""
    return [index] + [100 + i for i in range(length - 1)]


def token2wav(token_lists: list[list[int]]) -> list[bytes]:
    """The stand-in vocoder: one WAV per token sequence."""
    return [speak(tokens[0]) for tokens in token_lists]


def cosyvoice_payload(tokens: list[int], ground_truth: str) -> dict[str, Any]:
    """reward_tts.py's _remote_reward payload."""
    tokens_arr = np.array(tokens, dtype=np.int32).reshape(1, -1)
    lens_arr = np.array([[tokens_arr.shape[1]]], dtype=np.int32)
    return {"inputs": [
        {"name": "TOKENS", "shape": list(tokens_arr.shape), "datatype": "INT32", "data": tokens_arr.tolist()},
        {"name": "TOKEN_LENS", "shape": list(lens_arr.shape), "datatype": "INT32", "data": lens_arr.tolist()},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [ground_truth]}]}
