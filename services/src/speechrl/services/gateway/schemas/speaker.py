"""JSON models of /v1/speaker: similarity of a voice to a reference, embeddings, named speakers."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, model_validator

from speechrl.client import EmbeddingResult, RegisteredSpeaker, SpeakerId, SpeakerResult
from speechrl.services.gateway.errors import BadRequest
from speechrl.services.gateway.schemas.common import (
    EXAMPLE_WAV_BASE64,
    AudioFields,
    AudioIn,
    ItemErrorOut,
    audios_of,
    uploaded_audios,
)

SimilarityMapping = Literal["cosine", "shifted", "clipped"]


class SpeakerItemIn(AudioFields):
    """The audio whose voice is judged (audio_base64 or pcm_base64), and exactly one reference voice."""

    reference_audio: AudioIn | None = Field(default=None, description="Speech of the reference speaker.")
    reference_embedding: list[float] | None = Field(default=None, description="An embedding from /v1/speaker/embed of this scorer.")
    speaker_id: str | None = Field(default=None, description="A name given to /v1/speaker/register.", examples=["alice"])

    @model_validator(mode="after")
    def _one_reference(self) -> SpeakerItemIn:
        given = [n for n in ("reference_audio", "reference_embedding", "speaker_id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of reference_audio, reference_embedding or speaker_id (got {given or 'none'})")
        return self

    def reference(self, where: str) -> Any:
        """The reference as AsyncSpeakerClient.score takes it."""
        if self.speaker_id is not None:
            return SpeakerId(self.speaker_id)
        if self.reference_embedding is not None:
            return np.asarray(self.reference_embedding, dtype=np.float32)
        assert self.reference_audio is not None
        return self.reference_audio.to_audio(f"{where}.reference_audio")


async def uploaded_reference(reference_file: UploadFile | None, speaker_id: str | None) -> Any:
    """The reference of a multipart /score-upload: an uploaded file or a registered speaker's name."""
    if (reference_file is None) == (speaker_id is None):
        raise BadRequest("reference_file", "give exactly one of reference_file or speaker_id")
    if speaker_id is not None:
        return SpeakerId(speaker_id)
    assert reference_file is not None
    return (await uploaded_audios([reference_file]))[0]


class ScoreSpeakerBody(BaseModel):
    """A batch of comparisons."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"audio_base64": EXAMPLE_WAV_BASE64, "speaker_id": "alice"}], "reward_mapping": "cosine"}]})

    items: list[SpeakerItemIn] = Field(min_length=1, description="At least one item.")
    reward_mapping: SimilarityMapping | None = Field(
        default=None,
        description="cosine = raw cosine in [-1, 1] (seed-tts-eval SIM); shifted = (cosine + 1) / 2; "
                    "clipped = max(cosine, 0). Unset: the scorer's default.")

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of AsyncSpeakerClient.score."""
        return {"audios": [item.to_audio(f"items[{i}]") for i, item in enumerate(self.items)],
                "references": [item.reference(f"items[{i}]") for i, item in enumerate(self.items)],
                "reward_mapping": self.reward_mapping}


class SpeakerScoreOut(BaseModel):
    """Similarity of one audio to its reference voice."""

    model_config = ConfigDict(from_attributes=True)

    cosine: float = Field(description="Raw cosine similarity of the two embeddings, in [-1, 1].")
    reward: float
    reward_mapping: str = Field(examples=["cosine"])


class SpeakerResultOut(BaseModel):
    """A score or an error, never both."""

    model_config = ConfigDict(from_attributes=True)

    score: SpeakerScoreOut | None = None
    error: ItemErrorOut | None = None


class ScoreSpeakerReply(BaseModel):
    """One result per request item, in order."""

    results: list[SpeakerResultOut]

    @classmethod
    def of(cls, results: list[SpeakerResult]) -> ScoreSpeakerReply:
        return cls(results=[SpeakerResultOut.model_validate(r) for r in results])


class EmbedBody(BaseModel):
    """Audios to embed."""

    audios: list[AudioIn] = Field(min_length=1, description="At least one audio.")

    def client_args(self) -> dict[str, Any]:
        return {"audios": audios_of(self.audios, "audios")}


class EmbeddingOut(BaseModel):
    """The embedding of one audio, or its error."""

    embedding: list[float] | None = Field(default=None, description="float32 [D], L2-normalised.")
    error: ItemErrorOut | None = None


class EmbedReply(BaseModel):
    """One result per audio, in order."""

    results: list[EmbeddingOut]

    @classmethod
    def of(cls, results: list[EmbeddingResult]) -> EmbedReply:
        return cls(results=[EmbeddingOut(embedding=None if r.embedding is None else r.embedding.tolist(),
                                         error=None if r.error is None else ItemErrorOut.model_validate(r.error))
                            for r in results])


class RegisterBody(BaseModel):
    """A speaker to remember under a name; re-registering replaces it."""

    speaker_id: str = Field(min_length=1, description="The name later requests use as speaker_id.", examples=["alice"])
    audios: list[AudioIn] = Field(min_length=1, description="One or more audios of the speaker; their embeddings are averaged.")

    def client_args(self) -> dict[str, Any]:
        return {"speaker_id": self.speaker_id, "audios": audios_of(self.audios, "audios")}


class RegisterReply(BaseModel):
    """The stored speaker."""

    speaker_id: str
    embedding: list[float] = Field(description="The stored embedding, float32 [D], L2-normalised.")

    @classmethod
    def of(cls, speaker: RegisteredSpeaker) -> RegisterReply:
        return cls(speaker_id=speaker.speaker_id, embedding=speaker.embedding.tolist())
