"""Request and reply models shared by the routes: audio in JSON, per-item errors, alignment counts."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from speechrl.services.gateway.errors import BadRequest
from speechrl.v1 import common_pb2

# A 0.1 s 16 kHz mono WAV of silence, small enough for the docs' examples.
EXAMPLE_WAV_BASE64 = base64.b64encode(
    b"RIFF" + (36 + 3200).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
    + (32000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
    + b"data" + (3200).to_bytes(4, "little") + bytes(3200)).decode()

_PCM_ENCODINGS = {"s16le": common_pb2.PCM_S16LE, "f32le": common_pb2.PCM_F32LE}


def decode_base64(value: str, field: str) -> bytes:
    """Strict base64 (standard alphabet, padding required); a 400 naming field otherwise."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(field, f"not valid base64 ({exc})") from None


class AudioFields(BaseModel):
    """One audio in JSON: an encoded file as base64, or raw PCM as base64 with its format."""

    audio_base64: str | None = Field(default=None, description="An encoded file (WAV, FLAC or OGG/Vorbis) as standard base64.",
                                     examples=[EXAMPLE_WAV_BASE64])
    pcm_base64: str | None = Field(default=None, description="Raw interleaved little-endian PCM samples as base64, instead of audio_base64.")
    sample_rate_hertz: int | None = Field(default=None, gt=0, description="Required with pcm_base64: samples per second per channel.")
    pcm_encoding: Literal["s16le", "f32le"] = Field(default="s16le", description="Sample format of pcm_base64.")
    channels: int = Field(default=1, ge=1, le=32, description="Interleaved channels of pcm_base64; down-mixed by the scorer.")

    @model_validator(mode="after")
    def _one_source(self) -> AudioFields:
        if (self.audio_base64 is None) == (self.pcm_base64 is None):
            raise ValueError("give exactly one of audio_base64 (an encoded file) or pcm_base64 (raw samples)")
        if self.pcm_base64 is not None and self.sample_rate_hertz is None:
            raise ValueError("sample_rate_hertz is required with pcm_base64")
        return self

    def to_audio(self, where: str) -> common_pb2.Audio:
        """The Audio message; `where` locates this object in the request for error messages, e.g. items[2]."""
        if self.audio_base64 is not None:
            return common_pb2.Audio(encoded=decode_base64(self.audio_base64, f"{where}.audio_base64"))
        assert self.pcm_base64 is not None and self.sample_rate_hertz is not None  # checked by _one_source
        pcm = common_pb2.RawPcm(data=decode_base64(self.pcm_base64, f"{where}.pcm_base64"),
                                sample_rate_hertz=self.sample_rate_hertz,
                                encoding=_PCM_ENCODINGS[self.pcm_encoding], channels=self.channels)
        return common_pb2.Audio(pcm=pcm)


class AudioIn(AudioFields):
    """An audio given on its own, e.g. in a list of audios to embed."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"audio_base64": EXAMPLE_WAV_BASE64}]})


def audios_of(audios: list[AudioIn], field: str) -> list[common_pb2.Audio]:
    """Audio messages of a list field, located as field[i] in errors."""
    return [a.to_audio(f"{field}[{i}]") for i, a in enumerate(audios)]


async def uploaded_audios(files: list[UploadFile]) -> list[common_pb2.Audio]:
    """Audio messages of uploaded files (the scorer decodes them and reports bad ones per item)."""
    return [common_pb2.Audio(encoded=await f.read()) for f in files]


class ItemErrorOut(BaseModel):
    """Why one item could not be processed; the other items of the request are unaffected."""

    model_config = ConfigDict(from_attributes=True)

    code: str = Field(description="The kind of failure (ItemErrorCode without its prefix).", examples=["EMPTY_TEXT"])
    message: str = Field(description="A human-readable reason.", examples=["reference is empty"])
    field: str = Field(description="The request field at fault; empty when not one field.", examples=["items[1].reference"])


class ErrorCountsOut(BaseModel):
    """Alignment counts from jiwer."""

    model_config = ConfigDict(from_attributes=True)

    hits: int
    substitutions: int
    insertions: int
    deletions: int
