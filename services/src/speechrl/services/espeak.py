"""espeak-ng: finding it, and real speech from it for tests, the demo and generated data sets (no audio is committed).

>>> synth = EspeakSynthesizer(Path(tempfile.mkdtemp()))  # doctest: +SKIP
>>> synth.wav("hello world", voice="en-gb")[:4]           # doctest: +SKIP
b'RIFF'
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile  # noqa: F401 - used by the docstring example
from pathlib import Path


def espeak_binary() -> str:
    """The path of espeak-ng, or a RuntimeError that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/bootstrap.sh (apt-get install espeak-ng)")
    return path


class EspeakSynthesizer:
    """Speaks text with an espeak-ng voice into 22.05 kHz mono WAV files, cached by their settings."""

    def __init__(self, cache_dir: Path):
        self.espeak = espeak_binary()
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    def path(self, text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> Path:
        """The WAV file of text spoken by voice at rate (words per minute) and pitch (0-99)."""
        key = hashlib.sha1(f"{text}|{voice}|{rate}|{pitch}".encode()).hexdigest()[:16]
        out = self.cache_dir / f"{key}.wav"
        if not out.exists():
            partial = out.with_suffix(".partial.wav")
            subprocess.run([self.espeak, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(partial), text],
                           check=True, capture_output=True)
            partial.rename(out)  # atomic: concurrent users never read half a file
        return out

    def wav(self, text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> bytes:
        """WAV bytes of text spoken by voice."""
        return self.path(text, voice, rate, pitch).read_bytes()
