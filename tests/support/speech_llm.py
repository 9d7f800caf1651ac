"""Tiny random checkpoints of the speech-LLM families, in the libraries' own format: built from their config
classes, saved with `save_pretrained` (model and feature extractor), loaded back by path as a real one is."""

from __future__ import annotations

from pathlib import Path

import torch

AUDIO_TOKEN = 300  # the audio placeholder's id in the tiny vocabularies below
VOCAB = 320


def build_qwen3_asr(folder: Path, hidden: int = 64) -> Path:
    from transformers import Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration

    config = Qwen3ASRConfig(
        audio_config={"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                      "output_dim": hidden, "downsample_hidden_size": 32, "n_window": 50, "n_window_infer": 400},
        text_config={"hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 128, "vocab_size": VOCAB, "head_dim": 32},
        audio_token_id=AUDIO_TOKEN, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    Qwen3ASRForConditionalGeneration(config).save_pretrained(folder)
    Qwen3ASRFeatureExtractor().save_pretrained(folder)
    return folder


def build_qwen2_audio(folder: Path, hidden: int = 64) -> Path:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    config = Qwen2AudioConfig(
        audio_config={"d_model": 64, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
                      "num_mel_bins": 128, "max_source_positions": 1500},
        text_config={"model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": VOCAB},
        audio_token_index=AUDIO_TOKEN, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    return folder
