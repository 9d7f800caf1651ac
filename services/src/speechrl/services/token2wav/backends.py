"""token2wav backends by name: each turns a batch of speech-token sequences into waveforms.

    espeak-phonemes  espeak-ng renders the phoneme tokens of tokens.py, in the voice its voice token
                     names (else the item's); CPU, runs anywhere with espeak-ng
    cosyvoice2       CosyVoice2's flow matching (tokens -> mel, conditioned on a prompt speaker) + HiFT
                     vocoder, from a local CosyVoice2 folder; needs the cosyvoice package and a GPU

A speaker prompt is backend-specific: an espeak voice name ("en-us", "en-gb+f3") for espeak, a
prompt WAV for CosyVoice2 (its speaker embedding and prompt mel condition the flow).
"""

from __future__ import annotations

import hashlib
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

    model_dir: str = ""  # cosyvoice2: the local CosyVoice2 folder (cosyvoice2.yaml, flow.pt, hift.pt)
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


PROMPT_CACHE_SIZE = 64  # prompt speakers whose frontend features cosyvoice2 keeps


class CosyVoice2Backend:
    """CosyVoice2's token2wav: flow matching (speech tokens -> mel) + HiFT vocoder, from a local folder.

    Needs the `cosyvoice` package (github.com/FunAudioLLM/CosyVoice, on PYTHONPATH with its
    third_party/Matcha-TTS) and a CosyVoice2 folder (cosyvoice2.yaml, flow.pt, hift.pt,
    campplus.onnx, speech_tokenizer_v2.onnx). Tokens are CosyVoice2's 6561 speech-token ids.
    Written against CosyVoice's code of March 2026 (frontend_zero_shot reading a wav file, the flow's
    inference taking streaming / finalize); it cannot run on these machines: there is neither the
    package nor the weights.
    """

    num_tokens = 6561

    def __init__(self, options: BackendOptions):
        folder = Path(options.model_dir)
        if not options.model_dir or not (folder / "cosyvoice2.yaml").exists():
            raise FileNotFoundError(f"cosyvoice2 needs --model-dir pointing at a CosyVoice2 folder with "
                                    f"cosyvoice2.yaml, flow.pt and hift.pt; {folder} has none")
        try:
            from cosyvoice.cli.cosyvoice import CosyVoice2
        except ImportError as error:
            raise ImportError("cosyvoice2 needs the cosyvoice package: clone github.com/FunAudioLLM/CosyVoice and "
                              "put it and third_party/Matcha-TTS on PYTHONPATH") from error
        self.options = options
        self.cosyvoice = CosyVoice2(str(folder), load_jit=False, load_trt=False, fp16=options.device != "cpu")
        self.model = self.cosyvoice.model  # CosyVoice2Model: .flow, .hift, .device
        self.frontend = self.cosyvoice.frontend
        self.sample_rate_hertz = int(self.cosyvoice.sample_rate)
        self._prompts: dict[str, dict[str, Any]] = {}  # sha1 of a prompt WAV -> its frontend features, oldest first

    def modules(self) -> list[Any]:
        return [self.model.flow, self.model.hift]

    def synthesize(self, items: Sequence[SynthesisItem]) -> list[Waveform | Exception]:
        return [self._one(item) for item in items]

    def _one(self, item: SynthesisItem) -> Waveform | Exception:
        import torch

        if item.prompt_audio is None:
            return ValueError("cosyvoice2 needs a prompt WAV (the speaker prompt)")
        prompt = self._prompt(item.prompt_audio)
        device = self.model.device
        tokens = torch.tensor([list(item.tokens)], dtype=torch.int32, device=device)  # [1, T]

        def length(tensor: Any) -> Any:
            return torch.tensor([tensor.shape[1]], dtype=torch.int32, device=device)  # [1]

        # The flow and HiFT directly, as the GRPO recipe's reward server does: model.token2wav is the
        # streaming path and needs per-request (uuid) caches set up and torn down around each call. Autocast
        # as token2wav does: with fp16 the flow's weights are half, the prompt features float32.
        with torch.inference_mode(), torch.autocast(device.type, enabled=bool(self.model.fp16)):
            mel, _ = self.model.flow.inference(
                token=tokens, token_len=length(tokens), prompt_token=prompt["flow_prompt_speech_token"].to(device),
                prompt_token_len=length(prompt["flow_prompt_speech_token"]),
                prompt_feat=prompt["prompt_speech_feat"].to(device), prompt_feat_len=length(prompt["prompt_speech_feat"]),
                embedding=prompt["flow_embedding"].to(device), streaming=False, finalize=True)  # [1, 80, frames]
            speech, _ = self.model.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0))  # [1, S]
        return Waveform(speech.squeeze(0).float().cpu().numpy(), self.sample_rate_hertz)

    def _prompt(self, wav: bytes) -> dict[str, Any]:
        """The frontend's prompt features (speech tokens, mel, speaker embedding) of a prompt WAV, cached: a
        group's samples share their prompt. The frontend reads a wav file (load_wav), at >= 16 kHz."""
        key = hashlib.sha1(wav).hexdigest()
        if key not in self._prompts:
            with tempfile.NamedTemporaryFile(suffix=".wav") as file:
                file.write(wav)
                file.flush()
                self._prompts[key] = self.frontend.frontend_zero_shot("", "", file.name, self.sample_rate_hertz, "")
            while len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.pop(next(iter(self._prompts)))
        return self._prompts[key]


BACKENDS: dict[str, Callable[[BackendOptions], Token2WavBackend]] = {
    "espeak-phonemes": EspeakPhonemeBackend,
    "cosyvoice2": CosyVoice2Backend,
}


def load_backend(name: str, options: BackendOptions) -> Token2WavBackend:
    """The backend `name` of BACKENDS, built with options."""
    if name not in BACKENDS:
        raise ValueError(f"unknown token2wav backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](options)
