"""token2wav backends by name: each turns a batch of speech-token sequences into waveforms.

    espeak-phonemes  espeak-ng renders the phoneme tokens of tokens.py, in the voice its voice token
                     names (else the item's); CPU, runs anywhere with espeak-ng (espeak.py)
    cosyvoice2       CosyVoice2's flow matching (tokens -> mel, conditioned on a prompt speaker) + HiFT
                     vocoder, from a local CosyVoice2 folder (cosyvoice2.py); CPU or GPU

A speaker prompt is backend-specific: an espeak voice name ("en-us", "en-gb+f3") for espeak, a
prompt WAV for CosyVoice2 (its speaker embedding and prompt mel condition the flow).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import soundfile as sf

from speechrl.services.backend_registry import ImportedOnUse


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


BACKENDS: dict[str, Callable[[BackendOptions], Token2WavBackend]] = {
    "espeak-phonemes": ImportedOnUse("speechrl.services.token2wav.backends.espeak", "EspeakPhonemeBackend"),
    "cosyvoice2": ImportedOnUse("speechrl.services.token2wav.backends.cosyvoice2", "CosyVoice2Backend"),
}


def load_backend(name: str, options: BackendOptions) -> Token2WavBackend:
    """The backend `name` of BACKENDS, built with options."""
    if name not in BACKENDS:
        raise ValueError(f"unknown token2wav backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](options)
