"""Helpers of the trainer-adapter tests: a stand-in token2wav and a real uvicorn on a free port.

The token2wav service does not exist yet (issue 7), so the TTS paths are tested with this stand-in:
a token sequence [k, ...] "decodes" to SENTENCES[k] spoken by espeak-ng, real speech that the real
intelligibility scorer transcribes. It is importable as "tests.adapter_helpers:token2wav", the
form a verl YAML config uses.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from speechrl.services.espeak import EspeakSynthesizer
from speechrl.services.ports import free_port

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


@contextmanager
def uvicorn_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
