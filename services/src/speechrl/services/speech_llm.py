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
    embeddings_per_second: float  # about how many embeddings a second of audio gives (a generation budget)
    asr_prompt: str  # the family's transcription prompt, AUDIO where the embeddings go (ASR_PROMPTS)


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


AUDIO = "{audio}"


def qwen3_asr_prompt(language: str = "English") -> str:
    """Qwen3-ASR's transcription prompt with its answer's language forced to `language`, the full name the
    model was trained with (English, Chinese, ...: transformers' LANGUAGE_CODE_TO_NAME), AUDIO standing for
    the audio placeholder tokens. The intelligibility scorer forces each item's language with it.

    >>> qwen3_asr_prompt("Chinese").endswith("<|im_start|>assistant\\nlanguage Chinese<asr_text>")
    True
    """
    return ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|>" + AUDIO
            + f"<|audio_end|><|im_end|>\n<|im_start|>assistant\nlanguage {language}<asr_text>")


# The transcription prompt each family was trained with, AUDIO standing for the audio placeholder tokens:
# Qwen3-ASR's chat turn with an empty system context, its answer started with the language forced
# ("language English<asr_text>", as qwen-asr does for a known language) so that the completion is the
# transcript alone; Qwen2-Audio's (base) speech-recognition prompt with the language tag.
ASR_PROMPTS = {
    "qwen3_asr": qwen3_asr_prompt("English"),
    "qwen2_audio": "<|audio_bos|>" + AUDIO + "<|audio_eos|>Detect the language and recognize the speech: <|en|>",
}

FAMILIES = {
    "qwen3_asr": Family("Qwen3ASRForConditionalGeneration", None, _qwen3_asr_embed, _qwen3_asr_lengths, 13.0,
                        ASR_PROMPTS["qwen3_asr"]),
    "qwen2_audio": Family("Qwen2AudioForConditionalGeneration", 30.0, _qwen2_audio_embed, _qwen2_audio_lengths, 25.0,
                          ASR_PROMPTS["qwen2_audio"]),
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
        # Qwen3-ASR's extractor zero-pads shorter clips to min_length samples (0.5 s, as qwen-asr does) and counts the
        # padding as valid frames; Whisper's extractor (Qwen2-Audio) has no such minimum.
        self.min_samples = int(getattr(feature_extractor, "min_length", 0) or 0)
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
        samples = max(num_samples, self.min_samples)
        frames = min(samples // self.hop_length, self.window_frames)  # the extractor's valid frames
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


@dataclass
class SpeechLLM:
    """A whole speech-LLM checkpoint and its text decoder as a causal LM that shares the checkpoint's language
    model and head (the same modules: training the decoder trains the checkpoint), with the folder's other
    files (tokenizer, processor, feature extractor, chat template) kept in memory, so that `save` writes a folder
    the library's from_pretrained loads as the same family even after the source folder is gone."""

    whole: Any  # the family's *ForConditionalGeneration
    decoder: Any  # a causal LM of the text config's family (Qwen3ForCausalLM, Qwen2ForCausalLM)
    files: dict[str, bytes]  # file name -> contents, weights and configs excepted

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, contents in self.files.items():
            (folder / name).write_bytes(contents)
        self.whole.save_pretrained(str(folder))  # config.json, generation_config.json and the weights
        return folder


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".safetensors.index.json", ".bin.index.json")
WRITTEN_BY_SAVE = ("config.json", "generation_config.json")


def load_speech_llm(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> SpeechLLM:
    """A speech-LLM checkpoint folder loaded by the library's own from_pretrained (kwargs go there), its text
    decoder split out as a causal LM over the same modules."""
    import transformers
    from transformers import AutoModelForCausalLM

    family = FAMILIES[family_of(folder)]
    whole = getattr(transformers, family.model_class).from_pretrained(str(folder), dtype=dtype, **kwargs)
    with torch.device("meta"):  # every parameter is replaced below: nothing is allocated twice
        decoder = AutoModelForCausalLM.from_config(whole.config.text_config, dtype=dtype)
    decoder.model = whole.model.language_model
    decoder.lm_head = whole.lm_head
    decoder.generation_config = whole.generation_config
    files = {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir())
             if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WRITTEN_BY_SAVE}
    return SpeechLLM(whole, decoder.eval(), files)


def load_decoder(folder: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """The text decoder of a speech-LLM checkpoint as a causal LM of its text config's family: the library's
    own language model and head, loaded by its from_pretrained (kwargs go there), the audio half dropped."""
    return load_speech_llm(folder, dtype, **kwargs).decoder


def asr_prompt_ids(folder: str | Path, tokenizer: Any, prompt: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix ids, suffix ids): prompt, by default the family's transcription prompt (ASR_PROMPTS), tokenised
    by the checkpoint's tokenizer around the audio, whose embeddings the encoder service gives."""
    return prompt_ids_around_audio(prompt or FAMILIES[family_of(folder)].asr_prompt, tokenizer)


def prompt_ids_around_audio(prompt: str, tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix ids, suffix ids) of a prompt with one AUDIO in it, each side tokenised on its own by tokenizer."""
    head, tail = prompt.split(AUDIO)
    return (tuple(tokenizer(head, add_special_tokens=False)["input_ids"]),
            tuple(tokenizer(tail, add_special_tokens=False)["input_ids"]))



# Where a family checkpoint keeps its text decoder's tensors (transformers' own save format, and the legacy
# one Qwen2-Audio is saved back in), and the name each has in a plain causal LM of the text config's family.
DECODER_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
CAUSAL_LM_CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
EXPORTED = ".speechrl-decoder-complete"


def decoder_name(name: str) -> str | None:
    """The plain causal-LM name of a family checkpoint's tensor, None for the audio half.

    >>> decoder_name("model.language_model.layers.0.mlp.up_proj.weight"), decoder_name("language_model.lm_head.weight")
    ('model.layers.0.mlp.up_proj.weight', 'lm_head.weight')
    >>> decoder_name("model.audio_tower.conv2d1.weight") is None
    True
    """
    for old, new in DECODER_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def export_decoder(folder: str | Path, out: str | Path) -> Path:
    """The text decoder of a speech-LLM checkpoint folder written as a plain causal-LM checkpoint folder (the
    text config as config.json, tensors renamed by decoder_name, one file per source shard, the tokenizer and
    generation config copied): what an engine that serves text LMs from prompt embeddings (vLLM) loads, with
    the tensor names the trainer pushes. Reads only JSON and safetensors, so any transformers version does."""
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, final = Path(folder), Path(out)
    family_of(folder)
    if (final / EXPORTED).is_file():
        return final
    out = final.with_name(f"{final.name}.partial-{os.getpid()}")  # renamed into place when whole: servers
    shutil.rmtree(out, ignore_errors=True)  # exporting the same folder at once each write their own
    out.mkdir(parents=True)
    config = json.loads((folder / "config.json").read_text())
    text = dict(config["text_config"])
    if text.get("model_type") not in CAUSAL_LM_CLASSES:
        raise ValueError(f"{folder}: text model_type {text.get('model_type')!r} has no causal-LM export; known: "
                         f"{', '.join(sorted(CAUSAL_LM_CLASSES))}")
    text["architectures"] = [CAUSAL_LM_CLASSES[text["model_type"]]]
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if text.get(key) is None and config.get(key) is not None:
            text[key] = config[key]
    has_head = False
    for index, file in enumerate(sorted(folder.glob("*.safetensors"))):
        with safe_open(str(file), framework="pt") as handle:
            tensors = {new: handle.get_tensor(name) for name in handle.keys() if (new := decoder_name(name))}
        has_head = has_head or "lm_head.weight" in tensors
        if tensors:
            save_file(tensors, str(out / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
    text["tie_word_embeddings"] = not has_head  # a checkpoint without a head ties it to the embedding table
    (out / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for file in folder.iterdir():
        if file.is_file() and (file.name.startswith("tokenizer") or file.name in (
                "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")):
            shutil.copy(file, out / file.name)
    (out / EXPORTED).write_text(str(folder.resolve()) + "\n")
    shutil.rmtree(final, ignore_errors=True)  # an export cut short earlier (no EXPORTED marker)
    try:
        out.rename(final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(out, ignore_errors=True)
    return final


def exported_decoder_dir(folder: str | Path) -> Path:
    """Where export_decoder's copy of folder's decoder is kept: $SPEECHRL_CACHE_DIR (else ~/.cache/speechrl)
    /decoders/<a hash of the folder's path and its weights' sizes and times>, reused while they stay the same."""
    import hashlib
    import os

    folder = Path(folder).resolve()
    digest = hashlib.sha1(str(folder).encode())
    for file in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    root = Path(os.environ.get("SPEECHRL_CACHE_DIR") or Path.home() / ".cache" / "speechrl")
    return root / "decoders" / digest.hexdigest()[:16]
