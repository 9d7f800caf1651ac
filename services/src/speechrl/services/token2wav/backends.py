"""token2wav backends by name: each turns a batch of speech-token sequences into waveforms.

    espeak-phonemes  espeak-ng renders the phoneme tokens of tokens.py, in the voice its voice token
                     names (else the item's); CPU, runs anywhere with espeak-ng
    cosyvoice2       CosyVoice2's flow matching (tokens -> mel, conditioned on a prompt speaker) + HiFT
                     vocoder, from a local CosyVoice2 folder (token2wav/cosyvoice2.py); CPU or GPU

A speaker prompt is backend-specific: an espeak voice name ("en-us", "en-gb+f3") for espeak, a
prompt WAV for CosyVoice2 (its speaker embedding and prompt mel condition the flow).
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile as sf

from speechrl.services.token2wav.tokens import PhonemeVocabulary, _espeak


@dataclass(frozen=True)
class SynthesisItem:
    """One sequence to render: 0-based speech-token ids and a speaker prompt."""

    tokens: Sequence[int]
    voice: str = ""  # espeak voice name; "" is the backend's default
    prompt_audio: bytes | None = None  # a prompt WAV (CosyVoice2); unused by espeak
    rate_wpm: int = 0  # espeak speaking rate; 0 is the backend's default


@dataclass(frozen=True)
class Waveform:
    """Mono float32 samples in [-1, 1] at sample_rate_hertz."""

    samples: np.ndarray
    sample_rate_hertz: int

    def wav_bytes(self) -> bytes:
        """16-bit PCM WAV of the samples."""
        buffer = io.BytesIO()
        sf.write(buffer, self.samples, self.sample_rate_hertz, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


class Token2WavBackend(Protocol):
    """Renders a batch; one Waveform or one exception per item (an item's failure is its own)."""

    num_tokens: int  # speech-token ids accepted: 0..num_tokens-1

    def synthesize(self, items: Sequence[SynthesisItem]) -> list[Waveform | Exception]: ...

    def modules(self) -> list[Any]: ...  # torch modules that move with the GPU lease; [] for CPU backends


@dataclass
class BackendOptions:
    """Settings every backend reads what it needs from."""

    model_dir: str = ""  # cosyvoice2: the local CosyVoice2 folder (cosyvoice2.yaml, flow.pt, hift.pt, two .onnx)
    device: str = "cpu"  # where the model runs when it holds the lease
    default_voice: str = "en-us"  # espeak-phonemes: the voice when an item names none
    default_rate_wpm: int = 160  # espeak-phonemes: words per minute when an item sets none
    extra: dict[str, str] = field(default_factory=dict)  # backend-specific settings


class EspeakPhonemeBackend:
    """espeak-ng's phoneme input: [[phonemes]] spoken by a voice, 22.05 kHz."""

    def __init__(self, options: BackendOptions):
        self.vocabulary = PhonemeVocabulary()
        self.num_tokens = len(self.vocabulary)
        self.options = options
        self.espeak = _espeak()

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


def cosyvoice2_backend(options: BackendOptions) -> Token2WavBackend:
    """CosyVoice2's flow + HiFT (token2wav/cosyvoice2.py), imported only when asked for: it brings CosyVoice."""
    from speechrl.services.token2wav.cosyvoice2 import CosyVoice2Backend

    return CosyVoice2Backend(options)


BACKENDS: dict[str, Callable[[BackendOptions], Token2WavBackend]] = {
    "espeak-phonemes": EspeakPhonemeBackend,
    "cosyvoice2": cosyvoice2_backend,
}


def load_backend(name: str, options: BackendOptions) -> Token2WavBackend:
    """The backend `name` of BACKENDS, built with options."""
    if name not in BACKENDS:
        raise ValueError(f"unknown token2wav backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](options)
