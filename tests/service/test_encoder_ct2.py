"""The ct2-whisper encoder backend: pretrained tiny.en (CTranslate2) + seeded adaptor, served on loopback."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from speechrl.client.codec import tensor_to_numpy
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.config import parse_config
from speechrl.services.encoder.ct2 import (
    CT2_SETTINGS,
    CT2EncoderSettings,
    CT2WhisperEncoderModel,
    build_ct2_frontend,
    default_ct2_frontend,
    load_ct2_encoder,
)
from speechrl.services.encoder.server import EncoderConfig, load_model, start
from speechrl.services.ports import free_port
from speechrl.v1 import common_pb2, common_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from tests.support.servers import Speech, serve_in_thread

LLM_HIDDEN = 128
K = 4
RATE = 16_000
SENTENCES = ["Hello.", "Grace moved the blue box to the station.",
             "Seven engineers measured the latency of the thermostat in the northern laboratory this morning."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ct2_frontend(tmp_path_factory.mktemp("ct2"), LLM_HIDDEN, downsample_rate=K)


@pytest.fixture(scope="module")
def model(folder: Path) -> CT2WhisperEncoderModel:
    return load_ct2_encoder(folder)


@pytest.fixture(scope="module")
def stub(folder: Path) -> Iterator[encoder_pb2_grpc.AudioEncoderStub]:
    config = EncoderConfig(port=free_port(), backend="ct2-whisper", model_path=str(folder), max_wait_ms=20)
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        status = common_pb2_grpc.ServiceStatusStub(ch).GetServiceStatus(common_pb2.GetServiceStatusRequest())
        assert status.backend == "ct2-whisper" and status.model == str(folder)
        yield encoder_pb2_grpc.AudioEncoderStub(ch)


def samples(speech: Speech, text: str, voice: str = "en-us") -> np.ndarray:
    return decode_audio(AudioInput(encoded=speech.wav(text, voice=voice)), RATE, 30)


def expected_frames(num_samples: int) -> int:
    return math.ceil(math.ceil(math.ceil(num_samples / 160) / 2) / K)


def test_served_embeddings_match_in_process(stub: encoder_pb2_grpc.AudioEncoderStub, model: CT2WhisperEncoderModel,
                                            speech: Speech) -> None:
    request = encoder_pb2.EncodeAudioRequest(audios=[common_pb2.Audio(encoded=speech.wav(t)) for t in SENTENCES])
    replies = list(stub.EncodeAudio(request))
    assert [r.index for r in replies] == [0, 1, 2]
    clips = [samples(speech, t) for t in SENTENCES]
    local = model.encode(clips)  # one in-process batch of mixed buckets
    for clip, reply, mine in zip(clips, replies, local, strict=True):
        got = tensor_to_numpy(reply.embeddings)  # [T, D]
        seconds = clip.shape[0] / RATE
        assert got.shape == (expected_frames(clip.shape[0]), LLM_HIDDEN)
        assert abs(got.shape[0] - seconds * 50 / K) <= 1, "12.5 embeddings per second of audio"
        assert np.isfinite(got).all() and got.std() > 0
        np.testing.assert_allclose(got, mine.numpy(), rtol=1e-4, atol=1e-4)
    lengths = [r.length for r in replies]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_different_speech_gives_different_embeddings(model: CT2WhisperEncoderModel, speech: Speech) -> None:
    a, b = model.encode([samples(speech, "Open the red door."), samples(speech, "Close the green gate.")])
    n = min(a.shape[0], b.shape[0])
    assert (a[:n] - b[:n]).abs().mean() > 0.1 * a.abs().mean()
    # The same words in another voice stay closer than different words: the features carry content.
    c = model.encode([samples(speech, "Open the red door.", voice="en-gb")])[0]
    m = min(a.shape[0], c.shape[0])
    pooled = [x.mean(0) for x in (a, b, c)]  # [D] each
    assert m > 0 and pooled[0].sub(pooled[2]).norm() < 0.8 * pooled[0].sub(pooled[1]).norm()


def test_neighbours_and_bucket_do_not_change_an_item(model: CT2WhisperEncoderModel, speech: Speech) -> None:
    short, long = samples(speech, SENTENCES[1]), samples(speech, SENTENCES[2])
    alone = model.encode([short])[0]
    together = model.encode([long, short, long])[1]
    np.testing.assert_allclose(together.numpy(), alone.numpy(), rtol=1e-4, atol=1e-4)
    assert model.padded_samples(short.shape[0]) == 5 * RATE and model.padded_samples(40 * RATE) == 30 * RATE


def test_full_window_setting_and_folder_checks(folder: Path, tmp_path: Path, speech: Speech) -> None:
    window = build_ct2_frontend(tmp_path / "window", LLM_HIDDEN, downsample_rate=K,
                                settings=CT2EncoderSettings(pad_seconds=30))
    clip = samples(speech, SENTENCES[1])
    bucketed = load_ct2_encoder(folder).encode([clip])[0]
    full = load_ct2_encoder(window)
    assert full.features([clip]).shape == (1, 80, 3000)
    whole = full.encode([clip])[0]
    cosine = (whole * bucketed).sum(1) / (whole.norm(dim=1) * bucketed.norm(dim=1))  # [T]
    assert whole.shape == bucketed.shape and cosine.mean() > 0.9
    for bad in (0, 31, 0.015):
        with pytest.raises(ValueError, match="pad_seconds"):
            CT2EncoderSettings(pad_seconds=bad)
    (tmp_path / "window" / CT2_SETTINGS).write_text('{"whisper_model": "nowhere", "pad_seconds": 5}')
    with pytest.raises(FileNotFoundError, match="model.bin"):
        load_ct2_encoder(tmp_path / "window")
    wrong = build_ct2_frontend(tmp_path / "wrong", LLM_HIDDEN, encoder_dim=512)
    with pytest.raises(ValueError, match="encoder_dim"):
        load_ct2_encoder(wrong)
    with pytest.raises(ValueError, match="float16"):
        EncoderConfig(backend="ct2-whisper", model_dtype="bfloat16")
    with pytest.raises(ValueError, match="backend"):
        EncoderConfig(backend="onnx")


def test_default_folder_is_seeded_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = default_ct2_frontend(32, cache=tmp_path / "a")
    second = default_ct2_frontend(32, cache=tmp_path / "b")
    assert (first / "adaptor.safetensors").read_bytes() == (second / "adaptor.safetensors").read_bytes()
    assert default_ct2_frontend(32, cache=tmp_path / "a") == first
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    config = parse_config(EncoderConfig, "encoder", ["--backend", "ct2-whisper", "--tiny-llm-hidden-size", "32"])
    loaded = load_model(config)
    assert isinstance(loaded, CT2WhisperEncoderModel) and loaded.output_size == 32
    assert Path(loaded.whisper_path).name == "model" and (tmp_path / "xdg" / "speechrl").is_dir()


def test_the_ledger_counts_the_ct2_weights(model: CT2WhisperEncoderModel) -> None:
    """CTranslate2 reports no memory figure: the device-memory ledger counts its weights file, beside the adaptor's
    tensors (before, the Whisper encoder counted 0 and the ledger under-stated what the encoder holds)."""
    from speechrl.services.residency import module_bytes

    adaptor = sum(t.numel() * t.element_size() for t in (*model.adaptor.parameters(), *model.adaptor.buffers()))
    weights_file = Path(model.whisper_path) / "model.bin"
    assert weights_file.stat().st_size > 1_000_000  # tiny.en
    assert module_bytes(model.modules()) == adaptor + weights_file.stat().st_size
