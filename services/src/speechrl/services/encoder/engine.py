"""Audio-encoder engine: decode -> log-mel features -> Whisper encoder -> adaptor -> valid frames.

One result per item. Item problems (undecodable, empty, NaN, longer than the 30 s window, or an
output that would not fit in one gRPC message) are ItemFailures decided before the model runs, so
they never cost a forward pass and never touch their neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from speechrl.services.audio import AudioInput, decode_audio
from speechrl.services.encoder.model import AudioEncoderModel
from speechrl.services.errors import ErrorCode, ItemFailure

# Bytes per element of each output dtype the API offers.
OUTPUT_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# An EncodeAudioResponse beyond its tensor bytes: index, length, dtype, two shape varints and tags.
RESPONSE_OVERHEAD_BYTES = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class EncodeItem:
    """One audio to encode, and the element type its embeddings should have."""

    audio: AudioInput
    output_dtype: str = "float32"  # a key of OUTPUT_ITEMSIZE


@dataclass(frozen=True)
class EncodedAudio:
    """The embeddings of one item: valid frames only.

    `embeddings` is [T, D]: float32 for float32 and bfloat16 requests (bfloat16 values already
    rounded, so packing them is exact), float16 for float16 requests.
    """

    embeddings: np.ndarray
    output_dtype: str

    @property
    def length(self) -> int:
        """T, the number of valid frames."""
        return int(self.embeddings.shape[0])


class EncoderEngine:
    """Encodes batches of audio with an AudioEncoderModel, refusing what it cannot answer in one message.

    >>> import tempfile
    >>> from speechrl.services.encoder.model import load_audio_encoder
    >>> from speechrl.services.encoder.tiny import build_tiny_encoder
    >>> model = load_audio_encoder(build_tiny_encoder(tempfile.mkdtemp(), llm_hidden_size=16, encoder_layers=1))
    >>> engine = EncoderEngine(model, max_audio_seconds=30, max_message_bytes=64 * MIB)
    >>> pcm = AudioInput(pcm=np.zeros(16_000, "<f4").tobytes(), sample_rate_hertz=16_000, pcm_encoding="PCM_F32LE")
    >>> engine.encode_batch([EncodeItem(pcm)])[0].embeddings.shape  # 1 s: 100 mel frames, 50 encoder frames, / 4
    (13, 16)
    """

    def __init__(self, model: AudioEncoderModel, *, max_audio_seconds: float, max_message_bytes: int):
        if max_audio_seconds > model.window_seconds:
            raise ValueError(f"max_audio_seconds {max_audio_seconds:g} is over the encoder's {model.window_seconds:g} s "
                             f"window; this service does not chunk longer audio: set it to {model.window_seconds:g} or less")
        self.model = model
        self.max_audio_seconds = max_audio_seconds
        self.max_message_bytes = max_message_bytes

    def output_bytes(self, num_samples: int, output_dtype: str) -> int:
        """Size of the response message for a clip of num_samples at 16 kHz."""
        frames = self.model.output_lengths(num_samples)
        return frames * self.model.output_size * OUTPUT_ITEMSIZE[output_dtype] + RESPONSE_OVERHEAD_BYTES

    def largest_output_bytes(self, output_dtype: str = "float32") -> int:
        """Size of the response for the longest clip accepted (the whole window when max_audio_seconds is 30)."""
        return self.output_bytes(round(self.max_audio_seconds * self.model.sample_rate), output_dtype)

    def _check(self, item: EncodeItem) -> np.ndarray:
        """The 16 kHz samples of an item, or an ItemFailure raised for it."""
        if item.output_dtype not in OUTPUT_ITEMSIZE:
            raise ItemFailure(ErrorCode.INVALID_TENSOR, f"output dtype must be one of {sorted(OUTPUT_ITEMSIZE)}, "
                                                        f"got {item.output_dtype!r}")
        samples = decode_audio(item.audio, self.model.sample_rate, self.max_audio_seconds)
        # Resampling may add a sample past an exact 30 s; the window drops it, as Whisper's own features do.
        samples = samples[: self.model.window_samples]
        size = self.output_bytes(samples.shape[0], item.output_dtype)
        if size > self.max_message_bytes:
            frames = self.model.output_lengths(samples.shape[0])
            raise ItemFailure(
                ErrorCode.AUDIO_TOO_LONG,
                f"embeddings of this {samples.shape[0] / self.model.sample_rate:.1f} s clip would be "
                f"{size / MIB:.1f} MiB ({frames} frames x {self.model.output_size} x {item.output_dtype}), over the "
                f"server's {self.max_message_bytes / MIB:g} MiB message limit: send shorter audio, ask for float16 "
                "or bfloat16, or raise the server's max_message_mb")
        return samples

    def encode_batch(self, items: list[EncodeItem]) -> list[EncodedAudio | ItemFailure]:
        """Encode every item; a bad item gets an ItemFailure and the others are unaffected."""
        outcomes: list[EncodedAudio | ItemFailure | None] = [None] * len(items)
        clips: list[np.ndarray] = []
        positions: list[int] = []
        for i, item in enumerate(items):
            try:
                clips.append(self._check(item))
                positions.append(i)
            except ItemFailure as failure:
                outcomes[i] = failure
        if clips:
            for i, embeddings in zip(positions, self.model.encode(clips), strict=True):
                outcomes[i] = _finish(embeddings, items[i].output_dtype)
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]


def _finish(embeddings: torch.Tensor, output_dtype: str) -> EncodedAudio | ItemFailure:
    """Round [T, D] float32 embeddings to the output dtype; non-finite values are a failure, never a result."""
    if output_dtype == "float16":
        values = embeddings.to(torch.float16).numpy()  # [T, D] float16
    elif output_dtype == "bfloat16":
        values = embeddings.to(torch.bfloat16).float().numpy()  # [T, D] float32 holding bfloat16 values
    else:
        values = embeddings.numpy()  # [T, D] float32
    if not np.isfinite(values).all():
        return ItemFailure(ErrorCode.INTERNAL, f"the encoder produced non-finite embeddings in {output_dtype} "
                                               "(overflow? run the model in float32 or ask for float32 output)")
    return EncodedAudio(values, output_dtype)
