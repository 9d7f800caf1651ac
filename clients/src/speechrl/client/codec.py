"""Conversions between Python values and the API's Audio and Tensor messages.

>>> import numpy as np
>>> t = numpy_to_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
>>> tensor_to_numpy(t).shape
(2, 3)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from speechrl.v1 import common_pb2

# What callers may pass as audio: a file path, encoded file bytes, a (samples, rate) pair,
# or a ready Audio message.
AudioLike = str | os.PathLike | bytes | tuple[np.ndarray, int] | common_pb2.Audio

_DTYPES: dict[int, np.dtype] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
}
_DTYPE_ENUMS = {dt: enum for enum, dt in _DTYPES.items()}


class TensorError(ValueError):
    """A Tensor message whose dtype, shape and byte length disagree."""


def numpy_to_tensor(array: np.ndarray, dtype: int | None = None) -> common_pb2.Tensor:
    """Pack a numpy array (float16/32/64, int32/64) as a little-endian C-order Tensor.

    With dtype, the values are cast to that element type first; DTYPE_BFLOAT16 (which numpy lacks)
    rounds float values to nearest, ties to even, as torch's .to(torch.bfloat16) does.

    >>> tensor_to_numpy(numpy_to_tensor(np.array([1.0, 1.00390625, -2.5]), common_pb2.DTYPE_BFLOAT16))
    array([ 1. ,  1. , -2.5], dtype=float32)
    """
    if dtype == common_pb2.DTYPE_BFLOAT16:
        return common_pb2.Tensor(data=_bfloat16_bytes(array), dtype=common_pb2.DTYPE_BFLOAT16, shape=list(array.shape))
    if dtype is not None:
        if dtype not in _DTYPES:
            raise TensorError(f"cannot pack as dtype {dtype}; use a float or int DType")
        array = np.asarray(array, dtype=_DTYPES[dtype])
    native = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    enum = _DTYPE_ENUMS.get(np.dtype(native).newbyteorder("<"))
    if enum is None:
        raise TensorError(f"unsupported dtype {array.dtype}; use float16/32/64 or int32/64")
    data = np.ascontiguousarray(array, dtype=_DTYPES[enum]).tobytes()
    return common_pb2.Tensor(data=data, dtype=enum, shape=list(array.shape))  # type: ignore[arg-type]


def _bfloat16_bytes(array: np.ndarray) -> bytes:
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    # A NaN's low payload bits could round it into infinity; keep it a (quiet) NaN.
    rounded = np.where(np.isnan(array), 0x7FC0, rounded)
    return rounded.astype("<u2").tobytes()


def tensor_to_numpy(tensor: common_pb2.Tensor) -> np.ndarray:
    """Unpack a Tensor; bfloat16 is widened to float32. Raises TensorError when inconsistent."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if tensor.dtype == common_pb2.DTYPE_BFLOAT16:
        if len(tensor.data) != 2 * count:
            raise TensorError(f"bfloat16 shape {list(shape)} needs {2 * count} bytes, got {len(tensor.data)}")
        raw = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"unsupported or unset dtype {common_pb2.DType.Name(tensor.dtype) if tensor.dtype in common_pb2.DType.values() else tensor.dtype}")
    if len(tensor.data) != count * dtype.itemsize:
        raise TensorError(
            f"{common_pb2.DType.Name(tensor.dtype)} shape {list(shape)} needs "
            f"{count * dtype.itemsize} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def to_audio(audio: AudioLike) -> common_pb2.Audio:
    """Build an Audio message from a path, encoded bytes, a (samples, sample_rate) pair or an Audio.

    Arrays are sent as float32 PCM; a 2-D array is (samples, channels) and is down-mixed by the server.
    """
    if isinstance(audio, common_pb2.Audio):
        return audio
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return common_pb2.Audio(encoded=bytes(audio))
    if isinstance(audio, (str, os.PathLike)):
        return common_pb2.Audio(encoded=Path(audio).read_bytes())
    if isinstance(audio, tuple) and len(audio) == 2:
        samples, sample_rate = audio
        samples = np.asarray(samples)
        if samples.ndim not in (1, 2):
            raise ValueError(f"audio array must be 1-D (samples) or 2-D (samples, channels), got shape {samples.shape}")
        channels = 1 if samples.ndim == 1 else samples.shape[1]
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / 32768.0
        pcm = common_pb2.RawPcm(
            data=np.ascontiguousarray(samples, dtype="<f4").tobytes(),
            sample_rate_hertz=int(sample_rate), encoding=common_pb2.PCM_F32LE, channels=channels)
        return common_pb2.Audio(pcm=pcm)
    raise TypeError(f"cannot use {type(audio).__name__} as audio: pass a path, bytes, (array, sample_rate) or Audio")
