"""A random CosyVoice2 token2wav folder in the released checkpoint's layout, for tests and benchmarks.

No model hub is reachable here, so the tests (tiny sizes) and bench/token2wav.py (CosyVoice2-0.5B's
sizes) build one. `build_token2wav_folder` writes what CosyVoice2-0.5B holds for token2wav:
`cosyvoice2.yaml` (the released file's structure and classes at the chosen sizes; the flow's encoder
keeps its 512 channels at any size, as CosyVoice's UpsampleConformerEncoder hard-codes them; the LLM and
a data-pipeline entry stay in, as in the real file, and would fail to build here: the backend must
leave them out), `flow.pt`, `hift.pt` (keys with the HiFiGan wrapper's `generator.` prefix), and the two
ONNX models of the zero-shot frontend with the real files' inputs and outputs but a random projection
inside: `campplus.onnx` (fbank [1, T, 80] -> embedding [1, 192]) and `speech_tokenizer_v2.onnx`
(log-mel [1, 128, F] and its length -> 6561-way tokens [1, ceil(F / 4)]). Needs CosyVoice's code, as
the backend does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from speechrl.services.token2wav.backends.cosyvoice2 import CosyVoice2Backend, token2wav_config


@dataclass(frozen=True)
class Token2WavSizes:
    """The sizes cosyvoice2.yaml sets for the flow's encoder and estimator and for HiFT."""

    encoder_heads: int
    encoder_units: int
    encoder_blocks: int
    estimator_channels: int
    estimator_head_dim: int
    estimator_blocks: int
    estimator_mid_blocks: int
    estimator_heads: int
    hift_channels: int
    hift_kernels: tuple[int, ...]
    hift_dilations: tuple[int, ...]


TINY = Token2WavSizes(encoder_heads=2, encoder_units=64, encoder_blocks=1, estimator_channels=32,
                      estimator_head_dim=16, estimator_blocks=1, estimator_mid_blocks=1, estimator_heads=2,
                      hift_channels=16, hift_kernels=(3,), hift_dilations=(1, 3))
# CosyVoice2-0.5B's cosyvoice2.yaml.
COSYVOICE2_05B = Token2WavSizes(encoder_heads=8, encoder_units=2048, encoder_blocks=6, estimator_channels=256,
                                estimator_head_dim=64, estimator_blocks=4, estimator_mid_blocks=12, estimator_heads=8,
                                hift_channels=512, hift_kernels=(3, 7, 11), hift_dilations=(1, 3, 5))

CONFIG = """\
sample_rate: 24000
llm_input_size: 896
llm_output_size: 896
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: 512
        attention_heads: {encoder_heads}
        linear_units: {encoder_units}
        num_blocks: {encoder_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 512
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{estimator_channels}]
            dropout: 0.0
            attention_head_dim: {estimator_head_dim}
            n_blocks: {estimator_blocks}
            num_mid_blocks: {estimator_mid_blocks}
            num_heads: {estimator_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: {hift_kernels}
    resblock_dilation_sizes: {hift_resblock_dilations}
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: {hift_source_dilations}
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}

parquet_opener: !name:cosyvoice.dataset.processor.parquet_opener
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""
SPEAKER_DIM = 192


def config_text(sizes: Token2WavSizes) -> str:
    """cosyvoice2.yaml at sizes."""
    values = {**asdict(sizes), "hift_kernels": list(sizes.hift_kernels)}
    dilations = [list(sizes.hift_dilations)]
    values["hift_resblock_dilations"] = dilations * len(sizes.hift_kernels)
    values["hift_source_dilations"] = dilations * 3  # one per upsampling stage
    return CONFIG.format(**values)


def build_token2wav_folder(folder: str | Path, sizes: Token2WavSizes = TINY, seed: int = 0) -> Path:
    """Write the folder with random weights (seeded); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = config_text(sizes)
    (folder / "cosyvoice2.yaml").write_text(text)
    torch.manual_seed(seed)
    config = token2wav_config(text)  # the flow and HiFT the backend builds, at random
    torch.save(config["flow"].state_dict(), folder / "flow.pt")
    torch.save({f"generator.{k}": v for k, v in config["hift"].state_dict().items()}, folder / "hift.pt")
    rng = np.random.default_rng(seed)
    _save_campplus(folder / "campplus.onnx", rng)
    _save_speech_tokenizer(folder / "speech_tokenizer_v2.onnx", rng)
    return folder


def _save_campplus(path: Path, rng: np.random.Generator) -> None:
    """The mean fbank frame through a random projection: [1, T, 80] -> [1, 192]."""
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(rng.normal(0, 0.3, (80, SPEAKER_DIM)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["mean", "weight"], ["output"])],
        "campplus", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, SPEAKER_DIM])], [weight])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _save_speech_tokenizer(path: Path, rng: np.random.Generator) -> None:
    """Every fourth log-mel frame's argmax over a random projection: 100 frames/s -> 25 tokens/s."""
    from onnx import TensorProto, helper, numpy_helper, save

    constants = [numpy_helper.from_array(rng.normal(0, 1, (128, CosyVoice2Backend.num_tokens)).astype(np.float32), "weight"),
                 *(numpy_helper.from_array(np.array([value], dtype=np.int64), name)
                   for name, value in (("start", 0), ("end", 2**31 - 1), ("axis", 1), ("step", 4)))]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["feats"], ["frames"], perm=[0, 2, 1]),  # [1, F, 128]
         helper.make_node("Slice", ["frames", "start", "end", "axis", "step"], ["kept"]),  # [1, ceil(F / 4), 128]
         helper.make_node("MatMul", ["kept", "weight"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["indices"], axis=2, keepdims=0)],
        "speech_tokenizer", [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "F"]),
                             helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "N"])], constants)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
