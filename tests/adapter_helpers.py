"""Helpers of the trainer-adapter tests: a stand-in token2wav.

The token2wav service does not exist yet (issue 7), so the TTS paths are tested with this stand-in:
a token sequence [k, ...] "decodes" to SENTENCES[k] spoken by espeak-ng, real speech that the real
intelligibility scorer transcribes. It is importable as "tests.adapter_helpers:token2wav", the
form a verl YAML config uses.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

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


