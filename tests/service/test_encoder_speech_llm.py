"""The encoder service on a speech LLM's own audio front-end (Qwen3-ASR, Qwen2-Audio): a tiny random
checkpoint in the library's format, loaded by path; its embeddings over gRPC equal what the library's
own forward splices into the decoder's input in place of the audio placeholder tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from speechrl.client import AudioEncoderClient
from speechrl.services.encoder.server import EncoderConfig, start
from speechrl.services.ports import free_port
from speechrl.services.speech_llm import family_of, load_speech_llm_encoder
from tests.support.servers import serve_in_thread
from tests.support.speech_llm import audio_token_id, build_qwen2_audio, build_qwen3_asr

FAMILIES: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    # family -> (builder, the library class, the name of its forward's feature-mask argument)
    "qwen3_asr": (build_qwen3_asr, "Qwen3ASRForConditionalGeneration", "input_features_mask"),
    "qwen2_audio": (build_qwen2_audio, "Qwen2AudioForConditionalGeneration", "feature_attention_mask"),
}


def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(int(16_000 * seconds)).astype(np.float32) * 0.1 for seconds in (3.0, 1.7)]


def library_audio_embeddings(folder: Path, class_name: str, mask_argument: str, clip: np.ndarray,
                             count: int) -> torch.Tensor:
    """What the library's forward puts at the audio placeholders of [audio x count, 5, 6] for clip: [count, D]."""
    import transformers
    from transformers import AutoFeatureExtractor

    model: Any = getattr(transformers, class_name).from_pretrained(str(folder)).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    padding = "max_length" if class_name.startswith("Qwen2Audio") else True
    features = extractor([clip], sampling_rate=16_000, return_tensors="pt", return_attention_mask=True, padding=padding)
    seen: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.setdefault("embeds", kwargs["inputs_embeds"])  # the decoder's input, audio spliced in

    model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    input_ids = torch.tensor([[audio_token_id(folder)] * count + [5, 6]])
    with torch.no_grad():
        model(input_ids=input_ids, input_features=features["input_features"],
              **{mask_argument: features["attention_mask"]})
    return seen["embeds"][0, :count]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_served_embeddings_equal_the_librarys_own(family: str, tmp_path: Path) -> None:
    build, class_name, mask_argument = FAMILIES[family]
    folder = build(tmp_path / family)
    assert family_of(folder) == family
    config = EncoderConfig(port=free_port(), backend="speech-llm", model_path=str(folder), threads=1)
    with serve_in_thread(lambda: start(config)) as running, \
            AudioEncoderClient(f"127.0.0.1:{running.port}") as client:
        served = [np.asarray(r.unwrap()) for r in client.encode([(c, 16_000) for c in clips()])]
    for clip, embeddings in zip(clips(), served, strict=True):
        expected = library_audio_embeddings(folder, class_name, mask_argument, clip, embeddings.shape[0])
        np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5)
    assert served[0].shape[0] > served[1].shape[0]  # the longer clip, more placeholders


def test_a_folder_of_another_family_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "whisper"}')
    with pytest.raises(ValueError, match="model_type 'whisper' is not a speech-LLM family served here; known: "
                                         "qwen2_audio, qwen3_asr"):
        family_of(tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_lengths_count_the_embeddings_encode_gives(family: str, tmp_path: Path) -> None:
    # 0.3 s and 0.4999 s are under Qwen3-ASR's 0.5 s minimum, which its extractor pads clips up to: counted from the
    # samples alone they would give 4 and 7 embeddings where encode gives 7 and 7.
    model = load_speech_llm_encoder(FAMILIES[family][0](tmp_path / family))
    rng = np.random.default_rng(1)
    for samples in (4_800, 7_999, 8_000, 16_037, 33_333):
        clip = (0.1 * rng.standard_normal(samples)).astype(np.float32)
        assert model.output_lengths(samples) == model.encode([clip])[0].shape[0], samples
