"""Tiny random checkpoints of the speech-LLM families, in the libraries' own format: built from their config
classes, saved with `save_pretrained` (model, feature extractor, tokenizer), loaded back by path as a real
one is. Their tokenizer is the tiny offline one of the rollout tests with the family's audio tokens added."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechrl.services.rollout.tiny import _build_tokenizer

AUDIO_TOKENS = {"qwen3_asr": ("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"),
                "qwen2_audio": ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")}


def audio_token_id(folder: Path) -> int:
    """The id of the audio placeholder of a checkpoint folder (its config's audio_token_id / audio_token_index)."""
    config = json.loads((folder / "config.json").read_text())
    return int(config.get("audio_token_id", config.get("audio_token_index")))


def _tokenizer(family: str):  # -> a transformers fast tokenizer
    tokenizer = _build_tokenizer(0)
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS[family])})
    return tokenizer


def build_qwen3_asr(folder: Path, hidden: int = 64) -> Path:
    """hidden: the decoder's width, in two heads (vLLM's CPU attention needs a head dim of 64: hidden 128)."""
    from transformers import Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration

    tokenizer = _tokenizer("qwen3_asr")
    config = Qwen3ASRConfig(
        audio_config={"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                      "output_dim": hidden, "downsample_hidden_size": 32, "n_window": 50, "n_window_infer": 400},
        text_config={"hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 128, "vocab_size": len(tokenizer), "head_dim": hidden // 2,
                     "initializer_range": 0.3},  # clear argmax margins, as in the rollout tests
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ASRForConditionalGeneration(config).save_pretrained(folder)
    Qwen3ASRFeatureExtractor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Tensor name prefixes of transformers' Qwen3-ASR and what qwen-asr's own layout calls them (the names vLLM's
# qwen3_asr loader maps: thinker.audio_tower.* holds the projector as proj1 / proj2).
QWEN_ASR_NAMES = (("model.audio_tower.", "thinker.audio_tower."),
                  ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
                  ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
                  ("model.language_model.", "thinker.model."), ("lm_head.", "thinker.lm_head."))


def build_qwen3_asr_qwen_asr_layout(folder: Path, hf_folder: Path, hidden: int = 128) -> Path:
    """build_qwen3_asr's tiny random model (written to hf_folder, transformers' format) saved again in qwen-asr's own
    layout, the Qwen/Qwen3-ASR-1.7B repository's, which vLLM's qwen3_asr model loads: config.json with a
    thinker_config (vLLM's Qwen3ASRConfig classes), the tensors renamed by QWEN_ASR_NAMES with the head stored
    (thinker.lm_head, a copy of the tied embedding table), a tokenizer that names its audio tokens, as vLLM's
    Qwen3ASRProcessor reads them, and the repository's feature extractor, Whisper's with 128 mel bins (which,
    unlike transformers' Qwen3-ASR one, does not pad clips to 0.5 s). The same weights: either engine on either
    folder is the same model.
    hidden: the decoder's width, in two heads (vLLM's CPU attention needs a head dim of 64: hidden 128)."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, WhisperFeatureExtractor
    from vllm.transformers_utils.configs.qwen3_asr import Qwen3ASRConfig

    build_qwen3_asr(hf_folder, hidden)
    hf = json.loads((hf_folder / "config.json").read_text())
    text = {key: value for key, value in hf["text_config"].items() if key not in ("model_type", "rope_parameters")}
    text.update(rope_theta=hf["text_config"]["rope_parameters"]["rope_theta"], tie_word_embeddings=False)
    audio = {key: value for key, value in hf["audio_config"].items() if key != "model_type"}
    config = Qwen3ASRConfig(thinker_config={"audio_config": audio, "text_config": text,
                                            "audio_token_id": hf["audio_token_id"]},
                            architectures=hf["architectures"], tie_word_embeddings=False)
    config.save_pretrained(folder)
    weights = load_file(str(hf_folder / "model.safetensors"))
    weights.setdefault("lm_head.weight", weights["model.language_model.embed_tokens.weight"].clone())
    renamed = {}
    for name, tensor in weights.items():
        old, new = next((old, new) for old, new in QWEN_ASR_NAMES if name.startswith(old))
        renamed[new + name[len(old):]] = tensor.contiguous()
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    start, pad, end = AUDIO_TOKENS["qwen3_asr"]
    AutoTokenizer.from_pretrained(str(hf_folder), extra_special_tokens={
        "audio_bos_token": start, "audio_token": pad, "audio_eos_token": end}).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    shutil.copy(hf_folder / "generation_config.json", folder / "generation_config.json")
    return folder


def build_qwen2_audio(folder: Path, hidden: int = 64) -> Path:
    """hidden: the decoder's width, in two heads."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    tokenizer = _tokenizer("qwen2_audio")
    config = Qwen2AudioConfig(
        audio_config={"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                      "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": len(tokenizer),
                     "initializer_range": 0.3},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


BUILDERS = {"qwen3_asr": build_qwen3_asr, "qwen2_audio": build_qwen2_audio}
# family -> (the library class, the name of its forward's feature-mask argument)
LIBRARY_CLASSES = {"qwen3_asr": ("Qwen3ASRForConditionalGeneration", "input_features_mask"),
                   "qwen2_audio": ("Qwen2AudioForConditionalGeneration", "feature_attention_mask")}


def library_inputs(folder: Path, clip: np.ndarray, input_ids: list[int]) -> tuple[Any, dict[str, torch.Tensor]]:
    """The library's own model of a checkpoint folder, loaded by path, and its forward's inputs for one 16 kHz
    clip and input_ids (the audio placeholders in it, one per embedding the encoder service gives)."""
    import transformers
    from transformers import AutoFeatureExtractor

    family = json.loads((folder / "config.json").read_text())["model_type"]
    class_name, mask_argument = LIBRARY_CLASSES[family]
    model: Any = getattr(transformers, class_name).from_pretrained(str(folder)).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    padding = "max_length" if family == "qwen2_audio" else True  # Qwen2-Audio's tower reads a fixed 30 s window
    features = extractor([clip], sampling_rate=16_000, return_tensors="pt", return_attention_mask=True, padding=padding)
    return model, {"input_ids": torch.tensor([input_ids]), "input_features": features["input_features"],
                   mask_argument: features["attention_mask"]}


def library_greedy(folder: Path, clip: np.ndarray, prefix: list[int], count: int, suffix: list[int],
                   new_tokens: int) -> list[int]:
    """The library model's greedy tokens (its generate) for prefix + count audio placeholders + suffix, up to
    its end-of-sequence."""
    model, inputs = library_inputs(folder, clip, [*prefix, *[audio_token_id(folder)] * count, *suffix])
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if t in eos), len(tokens))]
