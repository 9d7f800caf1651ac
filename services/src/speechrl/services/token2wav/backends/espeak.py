"""The espeak-phonemes token2wav backend: espeak-ng speaks the phoneme tokens of tokens.py."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from speechrl.services.espeak import espeak_binary
from speechrl.services.token2wav.backends import BackendOptions, SynthesisItem, Waveform
from speechrl.services.token2wav.tokens import PhonemeVocabulary


class EspeakPhonemeBackend:
    """espeak-ng's phoneme input: [[phonemes]] spoken by a voice, 22.05 kHz."""

    def __init__(self, options: BackendOptions):
        self.vocabulary = PhonemeVocabulary()
        self.num_tokens = len(self.vocabulary)
        self.options = options
        self.espeak = espeak_binary()

    def modules(self) -> list[Any]:
        return []

    def synthesize(self, items: Sequence[SynthesisItem]) -> list[Waveform | Exception]:
        return [self._one(item) for item in items]

    def _one(self, item: SynthesisItem) -> Waveform | Exception:
        phonemes = self.vocabulary.ids_to_phonemes(item.tokens)
        if not phonemes:
            return ValueError("no speakable phoneme tokens")
        voice = self.vocabulary.spoken_voice(item.tokens, item.voice or self.options.default_voice)
        rate = item.rate_wpm or self.options.default_rate_wpm
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "out.wav"
            done = subprocess.run([self.espeak, "-v", voice, "-s", str(rate), "-w", str(out), f"[[{phonemes}]]"],
                                  capture_output=True, text=True)
            if done.returncode != 0 or not out.exists():
                return LookupError(f"espeak-ng failed for voice {voice!r}: {done.stderr.strip()[:200]}")
            samples, rate_hertz = sf.read(out, dtype="float32")
        if samples.ndim > 1:
            samples = samples.mean(axis=1)
        return Waveform(samples.astype(np.float32), int(rate_hertz))
