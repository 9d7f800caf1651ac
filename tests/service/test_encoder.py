"""The audio-encoder gRPC server on loopback with a tiny random Whisper + adaptor, on real espeak speech."""

from __future__ import annotations

import io
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import WhisperForConditionalGeneration

from speechrl.client.codec import tensor_to_numpy
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.cli import service_modules
from speechrl.services.config import parse_config
from speechrl.services.encoder.engine import MIB, EncoderEngine
from speechrl.services.encoder.model import ADAPTOR_CONFIG, ADAPTOR_WEIGHTS, AudioEncoderModel, load_audio_encoder
from speechrl.services.encoder.server import EncoderConfig, start
from speechrl.services.encoder.tiny import build_tiny_encoder
from speechrl.services.ports import free_port
from speechrl.v1 import common_pb2, common_pb2_grpc, encoder_pb2, encoder_pb2_grpc
from tests.support.servers import RedisServer, Speech, serve_in_thread

LLM_HIDDEN = 512  # D; with k = 2 a 30 s clip is 750 x 512 x 4 B = 1.5 MiB, so four long clips pass 4 MiB
K = 2
RATE = 16_000
PARAGRAPH = ("Reinforcement learning for speech models needs rewards that can be trusted. The encoder turns "
             "every clip into a sequence of embeddings that the language model reads as if they were words. "
             "Long clips must stream back one item at a time, because a whole batch of them would not fit into "
             "a single message. Each item answers for itself, and a broken one never spoils its neighbours. ")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("encoder"), LLM_HIDDEN, downsample_rate=K, encoder_layers=1)


@pytest.fixture(scope="module")
def model(folder: Path) -> AudioEncoderModel:
    return load_audio_encoder(folder)


@pytest.fixture(scope="module")
def channel(folder: Path) -> Iterator[grpc.Channel]:
    config = EncoderConfig(port=free_port(), model_path=str(folder), max_request_items=16, max_wait_ms=20)
    with serve_in_thread(lambda: start(config)) as running:
        # A plain channel with gRPC's default 4 MiB receive limit: streaming must keep each reply under it.
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> encoder_pb2_grpc.AudioEncoderStub:
    return encoder_pb2_grpc.AudioEncoderStub(channel)


@pytest.fixture(scope="module")
def long_speech(speech: Speech) -> np.ndarray:
    """About 40 s of real speech at 16 kHz, to cut clips of any length from."""
    samples = decode_audio(AudioInput(encoded=speech.wav(PARAGRAPH * 2)), RATE, 600)
    assert samples.shape[0] > 36 * RATE
    return samples


def wav(samples: np.ndarray, subtype: str = "FLOAT") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, RATE, format="WAV", subtype=subtype)
    return out.getvalue()


def encode(stub: encoder_pb2_grpc.AudioEncoderStub, audios: list[common_pb2.Audio],
           dtype: int = common_pb2.DTYPE_UNSPECIFIED) -> list[encoder_pb2.EncodeAudioResponse]:
    replies = list(stub.EncodeAudio(encoder_pb2.EncodeAudioRequest(audios=audios, output_dtype=dtype)))  # type: ignore[arg-type]
    assert [r.index for r in replies] == list(range(len(audios)))
    return replies


def expected_frames(samples: int) -> int:
    return math.ceil(math.ceil(math.ceil(samples / 160) / 2) / K)


def test_embeddings_match_the_model_in_process(stub: encoder_pb2_grpc.AudioEncoderStub, model: AudioEncoderModel,
                                               speech: Speech) -> None:
    texts = ["Hello.", "The quick brown fox jumps over the lazy dog.",
             "Speech recognition with a large language model reads audio as embeddings, one frame at a time."]
    replies = encode(stub, [common_pb2.Audio(encoded=speech.wav(t)) for t in texts])
    lengths = []
    for text, reply in zip(texts, replies, strict=True):
        samples = decode_audio(AudioInput(encoded=speech.wav(text)), RATE, 30)
        got = tensor_to_numpy(reply.embeddings)
        assert reply.embeddings.dtype == common_pb2.DTYPE_FLOAT32
        assert got.shape == (reply.length, LLM_HIDDEN) and reply.length == expected_frames(samples.shape[0])
        assert np.isfinite(got).all() and got.std() > 0
        local = model.encode([samples])[0].numpy()  # [T, D], a batch of one in this process
        np.testing.assert_allclose(got, local, rtol=1e-4, atol=1e-5)
        lengths.append(reply.length)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1], "longer audio gives more frames"


@pytest.mark.parametrize("dtype, tolerance", [(common_pb2.DTYPE_FLOAT16, 2e-3), (common_pb2.DTYPE_BFLOAT16, 1e-2)])
def test_half_precision_outputs_decode(stub: encoder_pb2_grpc.AudioEncoderStub, speech: Speech,
                                       dtype: int, tolerance: float) -> None:
    audio = common_pb2.Audio(encoded=speech.wav("Half precision halves the bytes on the wire."))
    full, half = encode(stub, [audio])[0], encode(stub, [audio], dtype)[0]
    assert half.embeddings.dtype == dtype and half.length == full.length
    assert len(half.embeddings.data) == half.length * LLM_HIDDEN * 2
    reference = tensor_to_numpy(full.embeddings)
    np.testing.assert_allclose(tensor_to_numpy(half.embeddings).astype(np.float32), reference,
                               rtol=tolerance, atol=tolerance * np.abs(reference).max())


def test_long_clips_stream_past_four_mib(stub: encoder_pb2_grpc.AudioEncoderStub, long_speech: np.ndarray) -> None:
    seconds = [21.0, 24.5, 27.0, 30.0]
    replies = encode(stub, [common_pb2.Audio(encoded=wav(long_speech[: int(s * RATE)])) for s in seconds])
    sizes = [r.ByteSize() for r in replies]
    assert sum(sizes) > 4 * MIB and max(sizes) < 4 * MIB
    for s, reply in zip(seconds, replies, strict=True):
        assert reply.length == expected_frames(int(s * RATE)) and reply.embeddings.shape == [reply.length, LLM_HIDDEN]
    assert replies[-1].length == math.ceil(1500 / K), "30 s fills the Whisper window"


def test_bad_items_fail_alone(stub: encoder_pb2_grpc.AudioEncoderStub, speech: Speech, long_speech: np.ndarray) -> None:
    good = common_pb2.Audio(encoded=speech.wav("A good neighbour."))
    nan = np.full(RATE, 0.1, dtype="<f4")
    nan[100] = np.nan
    audios = [
        good,
        common_pb2.Audio(encoded=b"RIFF this is not a wav file"),
        common_pb2.Audio(encoded=b""),
        common_pb2.Audio(pcm=common_pb2.RawPcm(data=nan.tobytes(), sample_rate_hertz=RATE, encoding=common_pb2.PCM_F32LE)),
        common_pb2.Audio(encoded=wav(long_speech[: 35 * RATE])),
        common_pb2.Audio(),
        good,
    ]
    replies = encode(stub, audios)
    codes = [r.error.code if r.HasField("error") else None for r in replies]
    assert codes == [None, common_pb2.ITEM_ERROR_CODE_INVALID_AUDIO, common_pb2.ITEM_ERROR_CODE_EMPTY_AUDIO,
                     common_pb2.ITEM_ERROR_CODE_NON_FINITE_AUDIO, common_pb2.ITEM_ERROR_CODE_AUDIO_TOO_LONG,
                     common_pb2.ITEM_ERROR_CODE_INVALID_AUDIO, None]
    assert replies[4].error.field == "audios[4]" and "30 s" in replies[4].error.message
    solo = tensor_to_numpy(encode(stub, [good])[0].embeddings)
    for reply in (replies[0], replies[6]):
        np.testing.assert_allclose(tensor_to_numpy(reply.embeddings), solo, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("request_, field", [
    (encoder_pb2.EncodeAudioRequest(), "audios"),
    (encoder_pb2.EncodeAudioRequest(audios=[common_pb2.Audio(encoded=b"x")] * 17), "audios"),
    (encoder_pb2.EncodeAudioRequest(audios=[common_pb2.Audio(encoded=b"x")], output_dtype=common_pb2.DTYPE_INT32),
     "output_dtype"),
])
def test_malformed_requests_are_invalid_argument(stub: encoder_pb2_grpc.AudioEncoderStub, speech: Speech,
                                                 request_: encoder_pb2.EncodeAudioRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.EncodeAudio(request_))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(field)
    assert encode(stub, [common_pb2.Audio(encoded=speech.wav("Still here."))])[0].length > 0


def test_outputs_over_the_message_limit_are_refused_per_item(folder: Path, long_speech: np.ndarray) -> None:
    # At 1 MiB, a 30 s clip's 750 x 512 float32 embeddings (1.5 MiB) cannot be sent; float16 (0.7 MiB) can.
    # 16-bit WAV keeps the request itself (30 s = 0.9 MiB) under the 1 MiB limit.
    config = EncoderConfig(port=free_port(), model_path=str(folder), max_message_mb=1)
    clip, short = (common_pb2.Audio(encoded=wav(long_speech[: n * RATE], "PCM_16")) for n in (30, 1))
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub = encoder_pb2_grpc.AudioEncoderStub(ch)
        full = encode(stub, [clip, short])
        assert full[0].error.code == common_pb2.ITEM_ERROR_CODE_AUDIO_TOO_LONG
        assert "1.5 MiB" in full[0].error.message and "1 MiB message limit" in full[0].error.message
        assert full[1].length == expected_frames(RATE)
        assert encode(stub, [clip], common_pb2.DTYPE_FLOAT16)[0].length == 750


def test_lease_status_and_redis_outage(folder: Path, speech: Speech, redis_server: RedisServer) -> None:
    # A restarted Redis grants nothing for one lease TTL (lease.py: no two holders): a short TTL keeps it brief,
    # but a few seconds, as in test_intelligibility's outage test (1 s lapsed mid-batch on a busy machine).
    config = EncoderConfig(port=free_port(), model_path=str(folder), lease_device="cpu:0", residency="offload",
                           redis_url=redis_server.url, lease_wait_seconds=10, lease_ttl_ms=3000)
    audio = common_pb2.Audio(encoded=speech.wav("Taking turns on the device."))
    with serve_in_thread(lambda: start(config)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        stub, status = encoder_pb2_grpc.AudioEncoderStub(ch), common_pb2_grpc.ServiceStatusStub(ch)
        assert encode(stub, [audio])[0].length > 0
        reply = status.GetServiceStatus(common_pb2.GetServiceStatusRequest())
        assert reply.lease.device == "cpu:0" and not reply.lease.held and reply.residency == "offloaded"
        assert reply.service == "speechrl.v1.AudioEncoder" and reply.items_processed == 1
        redis_server.stop()
        with pytest.raises(grpc.RpcError) as info:
            encode(stub, [audio, audio])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "GPU lease" in (info.value.details() or "")
        redis_server.start()
        assert encode(stub, [audio])[0].length > 0, "the server recovers when Redis returns"


def test_health_status_and_cli(channel: grpc.Channel, folder: Path) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="speechrl.v1.AudioEncoder")).status == \
        health_pb2.HealthCheckResponse.SERVING
    status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert status.backend == "transformers-whisper" and status.residency == "resident" and not status.lease.device
    assert service_modules()["encoder"] == "speechrl.services.encoder.server"
    config = parse_config(EncoderConfig, "encoder", ["--model-path", str(folder), "--model-dtype", "bfloat16"])
    assert config.model_dtype == "bfloat16" and config.max_audio_seconds == 30.0
    with pytest.raises(ValueError, match="model_dtype"):
        EncoderConfig(model_dtype="int8")


def test_checkpoint_format(folder: Path, model: AudioEncoderModel, tmp_path: Path) -> None:
    # A WhisperModel save ("encoder.*" keys) loads like the WhisperForConditionalGeneration one ("model.encoder.*"),
    # and our encoder-only loader gives what transformers' own full load gives.
    full = WhisperForConditionalGeneration.from_pretrained(folder)
    full.model.save_pretrained(tmp_path)
    for name in ("preprocessor_config.json", ADAPTOR_CONFIG, ADAPTOR_WEIGHTS):
        shutil.copy(folder / name, tmp_path / name)
    clip = np.sin(np.arange(3 * RATE) / 7.0).astype(np.float32)
    features = model.features([clip])  # [1, 80, 3000]
    with torch.inference_mode():
        reference = model.adaptor(full.model.encoder(features).last_hidden_state)  # [1, 750, D]
    torch.testing.assert_close(model.forward(features), reference)
    torch.testing.assert_close(load_audio_encoder(tmp_path).forward(features), reference)
    with pytest.raises(ValueError, match="window"):
        EncoderEngine(model, max_audio_seconds=60, max_message_bytes=64 * MIB)
