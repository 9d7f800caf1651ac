"""CosyVoice2's token2wav: flow matching (speech tokens -> mel, conditioned on a prompt speaker) + HiFT.

Built from a CosyVoice2 folder by CosyVoice's own classes, named in its `cosyvoice2.yaml`; only the
flow, the vocoder and the mel extractor are built from it (the 0.5B LLM and the training pipeline the
same file describes are not, so the service holds only what it runs). A request's prompt WAV gives the
prompt features CosyVoice2's zero-shot frontend computes: speech tokens (speech_tokenizer_v2.onnx over
Whisper's 128-bin log-mel at 16 kHz), the prompt mel (the yaml's feat_extractor at 24 kHz) and the
speaker embedding (campplus.onnx over an 80-bin Kaldi fbank at 16 kHz). Rendering calls the flow's and
HiFT's inference directly, as CosyVoice2Model.token2wav does for a non-streaming request, and seeds
the vocoder's noise so that the same tokens give the same audio (and so the same reward).

Needs CosyVoice's code (`make setup` installs it; see scripts/bootstrap.sh) and a folder with
cosyvoice2.yaml, flow.pt, hift.pt, campplus.onnx and speech_tokenizer_v2.onnx. Checked on a tiny random
model in that layout (tests/service/test_token2wav_cosyvoice2.py) against CosyVoice2Model.token2wav.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speechrl.services.audio import AudioInput, decode_at_source_rate
from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.token2wav.backends import BackendOptions, SynthesisItem, Waveform

CONFIG_NAME = "cosyvoice2.yaml"
FOLDER_FILES = (CONFIG_NAME, "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx")
# What token2wav builds of cosyvoice2.yaml; every other object it describes is left out.
BUILT_ENTRIES = ("flow", "hift", "feat_extractor")
PROMPT_CACHE_SIZE = 64  # prompt speakers whose features are kept: a group's samples share their prompt
TOKENIZER_RATE = 16_000  # the speech tokenizer's and campplus's input rate
MAX_PROMPT_SECONDS = 30  # the speech tokenizer's limit (one Whisper window)
# A floor well under any real prompt: the mel's 1920-sample window is reflect-padded by 720 samples at
# 24 kHz (so at least 30 ms), and a speech token is 40 ms.
MIN_PROMPT_SECONDS = 0.1
SEED = 0  # HiFT's source noise: fixed, so that rendering is a function of its inputs


def token2wav_config(text: str) -> dict[str, Any]:
    """cosyvoice2.yaml with only BUILT_ENTRIES constructed: every other top-level object (!new:, !name:,
    !apply:) is overridden with None before hyperpyyaml resolves the file, so it is never imported or built."""
    from hyperpyyaml import load_hyperpyyaml
    from ruamel.yaml import YAML

    tree = YAML().load(text)
    tagged = [key for key, value in tree.items() if getattr(getattr(value, "tag", None), "value", None)]
    missing = [key for key in BUILT_ENTRIES if key not in tagged]
    if missing:
        raise ValueError(f"{CONFIG_NAME} has no {', '.join(missing)}: not a CosyVoice2 token2wav configuration")
    return load_hyperpyyaml(text, overrides={key: None for key in tagged if key not in BUILT_ENTRIES})


@dataclass
class PromptFeatures:
    """What a prompt WAV conditions the flow with, as CosyVoice2's frontend_zero_shot computes it."""

    speech_tokens: Any  # [1, T] int32
    mel: Any  # [1, ratio * T, 80] float32
    embedding: Any  # [1, 192] float32, campplus's raw output (the flow normalises it)


class CosyVoice2Backend:
    """CosyVoice2's flow + HiFT from a local CosyVoice2 folder; tokens are its 6561 speech-token ids.

    Usage (a real folder, e.g. CosyVoice2-0.5B's; the test builds a tiny one)::

        backend = CosyVoice2Backend(BackendOptions(model_dir="/models/CosyVoice2-0.5B"))
        [wave] = backend.synthesize([SynthesisItem(tokens, prompt_audio=open("a.wav", "rb").read())])
    """

    num_tokens = 6561

    def __init__(self, options: BackendOptions):
        folder = Path(options.model_dir)
        missing = [name for name in FOLDER_FILES if not (folder / name).is_file()]
        if not options.model_dir or missing:
            raise FileNotFoundError(f"cosyvoice2 needs --model-dir pointing at a CosyVoice2 folder with "
                                    f"{', '.join(FOLDER_FILES)}; {folder} lacks {', '.join(missing)}")
        try:
            import cosyvoice.flow.flow  # noqa: F401  (what the yaml names; fails here rather than inside hyperpyyaml)
            import hyperpyyaml  # noqa: F401
        except ImportError as error:
            raise ImportError(f"cosyvoice2 needs CosyVoice's code and its imports ({error}): `make setup` installs "
                              "them (services[cosyvoice2] and cosyvoice-minicpmo), or put a clone of "
                              "FunAudioLLM/CosyVoice and its third_party/Matcha-TTS on PYTHONPATH") from error
        import onnxruntime as ort
        import torch

        from speechrl.services.speaker.backends.wespeaker_onnx import session_options

        config = token2wav_config((folder / CONFIG_NAME).read_text())
        self.flow, self.hift = config["flow"], config["hift"]
        self.feat_extractor = config["feat_extractor"]
        self.sample_rate_hertz = int(config["sample_rate"])
        self.flow.load_state_dict(torch.load(folder / "flow.pt", map_location="cpu", weights_only=True), strict=True)
        # hift.pt is saved from the HiFiGan training wrapper: its keys carry a `generator.` prefix.
        hift_state = torch.load(folder / "hift.pt", map_location="cpu", weights_only=True)
        self.hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
        self.flow.eval()
        self.hift.eval()
        # On a GPU the flow runs in half precision under autocast, as CosyVoice2Model does with fp16.
        self.fp16 = options.device.startswith("cuda")
        if self.fp16:
            self.flow.half()
        # Both ONNX models run once per new prompt speaker (the features are cached), on the CPU, so that
        # they hold no GPU memory outside the lease.
        sessions = {name: ort.InferenceSession(str(folder / name), sess_options=session_options(1),
                                               providers=["CPUExecutionProvider"])
                    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx")}
        self.campplus, self.speech_tokenizer = sessions["campplus.onnx"], sessions["speech_tokenizer_v2.onnx"]
        from transformers import WhisperFeatureExtractor

        # The speech tokenizer's input: Whisper's 128-bin log-mel, as whisper.log_mel_spectrogram computes it.
        self.whisper_features = WhisperFeatureExtractor(feature_size=128, sampling_rate=TOKENIZER_RATE,
                                                        hop_length=160, n_fft=400)
        self._prompts: dict[str, PromptFeatures] = {}  # sha1 of a prompt WAV -> its features, oldest first

    def modules(self) -> list[Any]:
        return [self.flow, self.hift]

    def synthesize(self, items: Sequence[SynthesisItem]) -> list[Waveform | Exception]:
        return [self._one(item) for item in items]

    def _one(self, item: SynthesisItem) -> Waveform | Exception:
        if item.prompt_audio is None:
            return ItemFailure(ErrorCode.INVALID_AUDIO, "cosyvoice2 needs a prompt WAV (the speaker prompt)",
                               "prompt_audio")
        try:
            prompt = self.prompt_features(item.prompt_audio)
        except ItemFailure as failure:
            return failure.at("prompt_audio")
        return Waveform(self.render(item.tokens, prompt), self.sample_rate_hertz)

    def render(self, tokens: Sequence[int], prompt: PromptFeatures) -> np.ndarray:
        """[S] float32 samples at sample_rate_hertz of speech tokens in the prompt's voice."""
        import torch

        device = next(self.flow.parameters()).device  # where the lease's residency put the modules
        token = torch.tensor([list(tokens)], dtype=torch.int32, device=device)  # [1, T]

        def length(tensor: Any) -> Any:
            return torch.tensor([tensor.shape[1]], dtype=torch.int32, device=device)  # [1]

        prompt_tokens, prompt_mel = prompt.speech_tokens.to(device), prompt.mel.to(device)
        with (torch.inference_mode(), torch.autocast(device.type, enabled=self.fp16),
              torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):
            torch.manual_seed(SEED)
            mel, _ = self.flow.inference(token=token, token_len=length(token), prompt_token=prompt_tokens,
                                         prompt_token_len=length(prompt_tokens), prompt_feat=prompt_mel,
                                         prompt_feat_len=length(prompt_mel), embedding=prompt.embedding.to(device),
                                         streaming=False, finalize=True)  # [1, 80, ratio * T]
            speech, _ = self.hift.inference(speech_feat=mel, cache_source=torch.zeros(1, 1, 0, device=device))  # [1, S]
        return speech.squeeze(0).float().cpu().numpy()

    def prompt_features(self, wav: bytes) -> PromptFeatures:
        """The features of a prompt WAV (>= 16 kHz, 0.1 s to 30 s), cached by its bytes' hash; ItemFailure when
        the audio is not such a WAV."""
        key = hashlib.sha1(wav).hexdigest()
        if key not in self._prompts:
            self._prompts[key] = self._compute_prompt(wav)
            while len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.pop(next(iter(self._prompts)))
        return self._prompts[key]

    def _compute_prompt(self, wav: bytes) -> PromptFeatures:
        import torch
        import torchaudio.functional

        samples, rate = decode_at_source_rate(AudioInput(encoded=wav), max_seconds=math.inf)  # the range is below
        if rate < TOKENIZER_RATE:
            raise ItemFailure(ErrorCode.INVALID_AUDIO,
                              f"the prompt audio is {rate} Hz; cosyvoice2 needs at least {TOKENIZER_RATE} Hz")
        speech = torch.from_numpy(samples)[None]  # [1, N]
        seconds = speech.shape[1] / rate
        if not MIN_PROMPT_SECONDS <= seconds <= MAX_PROMPT_SECONDS:
            raise ItemFailure(ErrorCode.INVALID_AUDIO, f"the prompt audio is {seconds:.3f} s; cosyvoice2 takes "
                                                       f"{MIN_PROMPT_SECONDS} s to {MAX_PROMPT_SECONDS} s (the speech "
                                                       "tokenizer's window)")
        # Resampled with torchaudio, as CosyVoice's load_wav does: the features are then the ones it trained on.
        at_16k = torchaudio.functional.resample(speech, rate, TOKENIZER_RATE) if rate != TOKENIZER_RATE else speech
        at_out = (torchaudio.functional.resample(speech, rate, self.sample_rate_hertz)
                  if rate != self.sample_rate_hertz else speech)
        mel = self.feat_extractor(at_out).squeeze(0).transpose(0, 1)[None]  # [1, frames, 80]
        tokens = torch.tensor(self._speech_tokens(at_16k[0].numpy()), dtype=torch.int32)[None]  # [1, T]
        # The flow upsamples each token to token_mel_ratio frames: cut both to a whole number of tokens.
        ratio = int(self.flow.token_mel_ratio)
        count = min(mel.shape[1] // ratio, tokens.shape[1])
        embedding = torch.from_numpy(self._speaker_embedding(at_16k[0].numpy()))[None]  # [1, 192]
        return PromptFeatures(tokens[:, :count], mel[:, :ratio * count].contiguous(), embedding)

    def _speech_tokens(self, speech_16k: np.ndarray) -> list[int]:
        """speech_tokenizer_v2.onnx over Whisper's 128-bin log-mel of the whole clip (no 30 s padding)."""
        feats = self.whisper_features(speech_16k, sampling_rate=TOKENIZER_RATE, padding="longest",
                                      return_tensors="np").input_features.astype(np.float32)  # [1, 128, frames]
        inputs = self.speech_tokenizer.get_inputs()
        out = self.speech_tokenizer.run(None, {inputs[0].name: feats,
                                               inputs[1].name: np.array([feats.shape[2]], dtype=np.int32)})[0]
        return [int(t) for t in np.asarray(out).reshape(-1)]

    def _speaker_embedding(self, speech_16k: np.ndarray) -> np.ndarray:
        """campplus.onnx over the clip's 80-bin Kaldi fbank after mean subtraction: [192] float32."""
        from speechrl.services.speaker.features import FbankSettings, kaldi_fbank

        feats = kaldi_fbank(speech_16k, FbankSettings(sample_rate=TOKENIZER_RATE, num_mel_bins=80,
                                                      normalize_samples=True, cmn=True))  # [T, 80]
        out = self.campplus.run(None, {self.campplus.get_inputs()[0].name: feats[None]})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)
