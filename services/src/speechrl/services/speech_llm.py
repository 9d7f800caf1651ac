"""Speech-LLM checkpoints in transformers' own format, Qwen3-ASR and Qwen2-Audio, split as the services
serve them: the audio front-end in the encoder service, the text decoder in the rollout service.

The folder is what the library's `save_pretrained` writes for `Qwen3ASRForConditionalGeneration` or
`Qwen2AudioForConditionalGeneration` (config.json, the safetensors weights, the processor's
preprocessor_config.json and tokenizer), e.g. a snapshot of Qwen/Qwen3-ASR-0.6B or
Qwen/Qwen2-Audio-7B-Instruct. Both halves load through the library's own `from_pretrained`:

- `load_speech_llm_encoder`: the audio tower and multi-modal projector, with the checkpoint's own
  feature extractor; the embeddings are what the library's forward splices in place of the audio
  placeholder tokens, one per placeholder;
- `load_decoder`: the language model and its head as a plain causal LM of the text config's family
  (Qwen3ForCausalLM, Qwen2ForCausalLM), fed those embeddings as input embeddings.


    Qwen3-ASR     model.get_audio_features(input_features, input_features_mask).pooler_output:
                  128 mel bins, chunks of 2 * n_window frames, about 13 embeddings a second
    Qwen2-Audio   audio_tower(features, bidirectional mask of the valid frames) -> projector:
                  a 30 s window, 750 frames, (mel frames - 1) // 2 + 1 -> (n - 2) // 2 + 1 real ones

    model = load_speech_llm_encoder("/models/Qwen3-ASR-0.6B", device="cuda:0", dtype="bfloat16")
    [embeddings] = model.encode([samples_16k])   # [T, D]: D = the decoder's hidden size
    decoder = load_decoder("/models/Qwen3-ASR-0.6B", torch.bfloat16)   # a Qwen3ForCausalLM
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoFeatureExtractor

from speechrl.services.encoder.model import DTYPES, AudioEncoderModel


@dataclass(frozen=True)
class Family:
    """How one speech-LLM family is loaded and turns features into the embeddings its decoder reads."""

    model_class: str  # the transformers class of the whole checkpoint
    window_seconds: float | None  # longest clip one forward sees (None: any length, chunked by the tower)
    embed: Callable[[Any, dict[str, torch.Tensor]], list[torch.Tensor]]  # (inner model, features) -> [T_i, D] each
    lengths: Callable[[Any, torch.Tensor], torch.Tensor]  # (inner model, valid mel frames [B]) -> embeddings [B]


def _qwen3_asr_lengths(model: Any, frames: torch.Tensor) -> torch.Tensor:
    from transformers.models.qwen3_asr.modeling_qwen3_asr import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(frames, model.audio_tower.n_window)


def _qwen3_asr_embed(model: Any, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    mask = features["attention_mask"]  # [B, frames] 1 on valid mel frames
    packed = model.get_audio_features(input_features=features["input_features"],
                                      input_features_mask=mask).pooler_output  # [sum T_i, D]
    return list(packed.split(_qwen3_asr_lengths(model, mask.sum(-1)).tolist()))  # the clips, in order


def _qwen2_audio_lengths(model: Any, frames: torch.Tensor) -> torch.Tensor:
    return model.audio_tower._get_feat_extract_output_lengths(frames)[1]


def _qwen2_audio_embed(model: Any, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    from transformers.masking_utils import create_bidirectional_mask

    input_features, mask = features["input_features"], features["attention_mask"]  # [B, mels, 3000], [B, 3000]
    frames, out_lengths = model.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))  # [B], [B]
    batch, _, mel_frames = input_features.shape
    tower_frames = (mel_frames - 2) // 2 + 1  # after the stride-2 convolution
    valid = (torch.arange(tower_frames, device=frames.device)[None] < frames[:, None]).long()  # [B, 1500]
    attention = create_bidirectional_mask(config=model.audio_tower.config, attention_mask=valid,
                                          inputs_embeds=torch.zeros(batch, tower_frames, 1, dtype=input_features.dtype,
                                                                    device=input_features.device))
    hidden = model.audio_tower(input_features, attention_mask=attention).last_hidden_state  # [B, 750, C]
    embeddings = model.multi_modal_projector(hidden)  # [B, 750, D]
    return [embeddings[i, : int(out_lengths[i])] for i in range(batch)]


FAMILIES = {
    "qwen3_asr": Family("Qwen3ASRForConditionalGeneration", None, _qwen3_asr_embed, _qwen3_asr_lengths),
    "qwen2_audio": Family("Qwen2AudioForConditionalGeneration", 30.0, _qwen2_audio_embed, _qwen2_audio_lengths),
}


def family_of(folder: str | Path) -> str:
    """The model_type of a checkpoint folder, if it is a family served here; ValueError naming the known ones."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a speech-LLM checkpoint is a save_pretrained folder")
    model_type = json.loads(path.read_text()).get("model_type", "")
    if model_type not in FAMILIES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not a speech-LLM family served here; known: "
                         f"{', '.join(sorted(FAMILIES))}")
    return model_type


class SpeechLLMAudioEncoder(AudioEncoderModel):
    """A speech LLM's audio tower + projector and feature extractor, with AudioEncoderModel's interface."""

    def __init__(self, family: Family, inner: Any, feature_extractor: Any, output_size: int,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.family = family
        self.inner: Any = inner  # the checkpoint's inner model (nn.Module), its language model dropped
        self.feature_extractor = feature_extractor
        self.device, self.dtype = device, dtype
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.hop_length = int(feature_extractor.hop_length)
        window = family.window_seconds or 600.0  # a chunked tower has no window: cap a clip at 10 minutes
        self.window_samples = int(window * self.sample_rate)
        self.window_frames = self.window_samples // self.hop_length
        self._output_size = output_size

    @property
    def output_size(self) -> int:
        """D, the decoder's hidden size."""
        return self._output_size

    def modules(self) -> Sequence[nn.Module]:
        return (self.inner.audio_tower, self.inner.multi_modal_projector)

    def output_lengths(self, num_samples: int) -> int:
        frames = min(num_samples // self.hop_length, self.window_frames)  # the extractor's valid frames
        return int(self.family.lengths(self.inner, torch.tensor([frames]))[0])

    def features(self, clips: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The checkpoint's own features of 16 kHz clips, with the mask of their valid mel frames."""
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        if self.family.window_seconds is not None:  # a fixed window: pad (and cut) every clip to it
            out = self.feature_extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt",
                                         return_attention_mask=True, padding="max_length", truncation=True)
        else:
            out = self.feature_extractor(clips, sampling_rate=self.sample_rate, return_tensors="pt",
                                         return_attention_mask=True, padding="longest", truncation=False)
        return {"input_features": out["input_features"].to(self.device, self.dtype),
                "attention_mask": out["attention_mask"].to(self.device)}

    @torch.inference_mode()
    def encode(self, clips: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Embeddings of 16 kHz clips, one per audio placeholder: [T_i, D] float32 on the CPU each."""
        return [e.float().cpu() for e in self.family.embed(self.inner, self.features(clips))]


def load_speech_llm_encoder(folder: str | Path, device: str = "cpu", dtype: str = "float32") -> SpeechLLMAudioEncoder:
    """The audio front-end of a Qwen3-ASR / Qwen2-Audio checkpoint folder, on the CPU until moved to device."""
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    family = FAMILIES[family_of(folder)]
    model = getattr(transformers, family.model_class).from_pretrained(str(folder), dtype=DTYPES[dtype])
    inner = model.model
    output_size = int(model.config.text_config.hidden_size)
    inner.language_model = None  # the decoder is the rollout service's and the trainer's, not ours
    inner.eval().requires_grad_(False)
    return SpeechLLMAudioEncoder(family, inner, AutoFeatureExtractor.from_pretrained(str(folder)), output_size,
                                 device=device, dtype=DTYPES[dtype])


def is_speech_llm(folder: str | Path) -> bool:
    """Whether folder is a checkpoint of a speech-LLM family served here (by its config.json's model_type)."""
    path = Path(folder) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type", "") in FAMILIES


def load_decoder(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """The text decoder of a speech-LLM checkpoint as a causal LM of its text config's family: the library's
    own language model and head, loaded by its from_pretrained (kwargs go there), the audio half dropped."""
    import transformers
    from transformers import AutoModelForCausalLM

    family = FAMILIES[family_of(folder)]
    model = getattr(transformers, family.model_class).from_pretrained(str(folder), dtype=dtype, **kwargs)
    text_config = model.config.text_config
    with torch.device("meta"):  # every parameter is replaced below: nothing is allocated twice
        decoder = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    decoder.model = model.model.language_model
    decoder.lm_head = model.lm_head
    decoder.generation_config = model.generation_config
    return decoder.eval()
