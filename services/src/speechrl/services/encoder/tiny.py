"""A tiny random encoder checkpoint, built offline, for tests and CPU laptops.

It has the real format (see speechrl.services.encoder.model) and the real Whisper geometry that
matters to the service (80 mel bins, 30 s window, 1500 encoder frames), but random weights and a
d_model of 64, so a forward pass takes milliseconds. Its embeddings mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from speechrl.services.encoder.model import Adaptor, AdaptorConfig, save_adaptor


def build_tiny_encoder(folder: str | Path, llm_hidden_size: int, *, downsample_rate: int = 4,
                       adaptor_hidden_size: int = 128, encoder_layers: int = 2, d_model: int = 64,
                       seed: int = 0) -> Path:
    """Save a random Whisper (encoder layers as asked, one small decoder layer) + features + adaptor.

    >>> import tempfile
    >>> from speechrl.services.encoder.model import load_audio_encoder
    >>> folder = build_tiny_encoder(tempfile.mkdtemp(), llm_hidden_size=32)
    >>> load_audio_encoder(folder).output_size
    32
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    # Token ids are set inside the small vocabulary; only the encoder ever runs.
    config = WhisperConfig(
        vocab_size=128, num_mel_bins=80, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_source_positions=1500, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=[])
    WhisperForConditionalGeneration(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16_000, hop_length=160, chunk_length=30,
                            n_fft=400).save_pretrained(folder)
    adaptor = Adaptor(AdaptorConfig(downsample_rate=downsample_rate, encoder_dim=d_model,
                                    hidden_size=adaptor_hidden_size, output_size=llm_hidden_size))
    save_adaptor(folder, adaptor)
    return folder
