"""Decoding of request audio: any container or PCM, any rate, any channel count -> mono float32.

Every way audio can be bad ends in an ItemFailure that names the problem, never an exception
that escapes to the server.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

from speechrl.services.errors import ErrorCode, ItemFailure

PCM_DTYPES: dict[str, np.dtype] = {"PCM_S16LE": np.dtype("<i2"), "PCM_F32LE": np.dtype("<f4")}


@dataclass(frozen=True)
class AudioInput:
    """Audio as it arrived: encoded file bytes, or raw PCM with its description."""

    encoded: bytes | None = None
    pcm: bytes | None = None
    sample_rate_hertz: int = 0
    pcm_encoding: str = ""  # a key of PCM_DTYPES
    channels: int = 1


def decode_audio(audio: AudioInput, target_rate: int, max_seconds: float) -> np.ndarray:
    """Decode to mono float32 at target_rate. Raises ItemFailure naming what is wrong."""
    samples, rate = decode_at_source_rate(audio, max_seconds)
    if rate != target_rate:
        samples = soxr.resample(samples, rate, target_rate, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


def decode_at_source_rate(audio: AudioInput, max_seconds: float) -> tuple[np.ndarray, int]:
    """(mono float32 samples, their rate), checked as decode_audio checks them, for a caller that resamples in
    its own way. Raises ItemFailure naming what is wrong."""
    if audio.encoded is not None:
        samples, rate = _decode_container(audio.encoded)
    elif audio.pcm is not None:
        samples, rate = _decode_pcm(audio)
    else:
        raise ItemFailure(ErrorCode.INVALID_AUDIO, "no audio given: set encoded or pcm")
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float32)
    if samples.size == 0:
        raise ItemFailure(ErrorCode.EMPTY_AUDIO, "audio has no samples")
    if not np.isfinite(samples).all():
        bad = int(np.count_nonzero(~np.isfinite(samples)))
        raise ItemFailure(ErrorCode.NON_FINITE_AUDIO, f"audio has {bad} NaN or infinite samples")
    seconds = samples.shape[0] / rate
    if seconds > max_seconds:
        raise ItemFailure(ErrorCode.AUDIO_TOO_LONG, f"audio is {seconds:.1f} s, over the server's max_audio_seconds of {max_seconds:g} s")
    return np.ascontiguousarray(samples, dtype=np.float32), rate


def _decode_container(data: bytes) -> tuple[np.ndarray, int]:
    if not data:
        raise ItemFailure(ErrorCode.EMPTY_AUDIO, "encoded audio is zero bytes")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ItemFailure(ErrorCode.INVALID_AUDIO, f"cannot decode audio bytes as WAV/FLAC/OGG: {exc}") from None
    return samples, int(rate)


def _decode_pcm(audio: AudioInput) -> tuple[np.ndarray, int]:
    dtype = PCM_DTYPES.get(audio.pcm_encoding)
    if dtype is None:
        raise ItemFailure(ErrorCode.INVALID_AUDIO, f"pcm.encoding must be one of {sorted(PCM_DTYPES)}, got {audio.pcm_encoding or 'unset'}")
    if not 1000 <= audio.sample_rate_hertz <= 384_000:
        raise ItemFailure(ErrorCode.INVALID_AUDIO, f"pcm.sample_rate_hertz must be in [1000, 384000], got {audio.sample_rate_hertz}")
    channels = audio.channels or 1
    if not 1 <= channels <= 64:
        raise ItemFailure(ErrorCode.INVALID_AUDIO, f"pcm.channels must be in [1, 64], got {channels}")
    data = audio.pcm or b""
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise ItemFailure(ErrorCode.INVALID_AUDIO,
                          f"pcm.data has {len(data)} bytes, not a multiple of {frame_bytes} ({audio.pcm_encoding} x {channels} channels)")
    samples = np.frombuffer(data, dtype=dtype)
    samples = samples.astype(np.float32) / 32768.0 if dtype.kind == "i" else samples.astype(np.float32)
    return samples.reshape(-1, channels) if channels > 1 else samples, audio.sample_rate_hertz
