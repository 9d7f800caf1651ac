"""Audio decoding shared by every service: formats, rates, channels and every kind of bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from speechrl.client.codec import to_audio
from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.errors import ErrorCode, ItemFailure
from speechrl.services.servicing import audio_from_proto


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt)
    return buf.getvalue()


def tone(rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_containers_and_rates_are_resampled_to_the_target(fmt: str, rate: int) -> None:
    out = decode_audio(AudioInput(encoded=encode(tone(rate), rate, fmt)), 16000, 60)
    assert out.dtype == np.float32
    assert abs(out.shape[0] - 8000) <= 16
    assert 0.15 < np.abs(out).max() < 0.45


def test_stereo_is_downmixed() -> None:
    out = decode_audio(AudioInput(encoded=encode(tone(16000, channels=2), 16000, "WAV")), 16000, 60)
    assert out.ndim == 1 and out.shape[0] == 8000


def test_pcm_s16_and_f32_through_the_client_codec() -> None:
    samples = tone(8000, channels=2)
    f32 = audio_from_proto(to_audio((samples, 8000)))
    assert decode_audio(f32, 16000, 60).shape[0] == pytest.approx(8000, abs=16)
    s16 = audio_from_proto(to_audio(((samples * 32767).astype(np.int16), 8000)))
    np.testing.assert_allclose(decode_audio(s16, 8000, 60), samples.mean(axis=1), atol=1e-3)


def failure(audio: AudioInput, max_seconds: float = 60) -> ItemFailure:
    with pytest.raises(ItemFailure) as info:
        decode_audio(audio, 16000, max_seconds)
    return info.value


def test_every_bad_input_is_a_named_item_failure() -> None:
    assert failure(AudioInput(encoded=b"not audio at all")).code is ErrorCode.INVALID_AUDIO
    assert failure(AudioInput(encoded=b"")).code is ErrorCode.EMPTY_AUDIO
    assert failure(AudioInput()).code is ErrorCode.INVALID_AUDIO
    nan = np.full(100, np.nan, dtype="<f4").tobytes()
    f = failure(AudioInput(pcm=nan, sample_rate_hertz=16000, pcm_encoding="PCM_F32LE"))
    assert f.code is ErrorCode.NON_FINITE_AUDIO and "100 NaN" in f.message
    f = failure(AudioInput(pcm=b"", sample_rate_hertz=16000, pcm_encoding="PCM_F32LE"))
    assert f.code is ErrorCode.EMPTY_AUDIO
    f = failure(AudioInput(pcm=b"\x00\x00\x00", sample_rate_hertz=16000, pcm_encoding="PCM_S16LE"))
    assert f.code is ErrorCode.INVALID_AUDIO and "multiple of 2" in f.message
    f = failure(AudioInput(pcm=b"\x00\x00", sample_rate_hertz=16000, pcm_encoding=""))
    assert "pcm.encoding" in f.message
    f = failure(AudioInput(pcm=b"\x00\x00", sample_rate_hertz=7, pcm_encoding="PCM_S16LE"))
    assert "sample_rate_hertz" in f.message
    f = failure(AudioInput(encoded=encode(tone(16000, seconds=3), 16000, "WAV")), max_seconds=2)
    assert f.code is ErrorCode.AUDIO_TOO_LONG and "3.0 s" in f.message
    # A WAV header promising more than it holds, cut mid-way.
    truncated = encode(tone(16000), 16000, "WAV")[:30]
    assert failure(AudioInput(encoded=truncated)).code in (ErrorCode.INVALID_AUDIO, ErrorCode.EMPTY_AUDIO)


def test_item_failure_locates_its_field() -> None:
    f = ItemFailure(ErrorCode.EMPTY_AUDIO, "audio has no samples").at("items[2].audio")
    assert f.field == "items[2].audio" and "EMPTY_AUDIO" in str(f)
