"""/v1/speaker: speaker similarity, embeddings and named reference speakers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from speechrl.services.gateway.deps import SpeakerDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.schemas.common import uploaded_audios
from speechrl.services.gateway.schemas.speaker import (
    EmbedBody,
    EmbedReply,
    RegisterBody,
    RegisterReply,
    ScoreSpeakerBody,
    ScoreSpeakerReply,
    SimilarityMapping,
    uploaded_reference,
)

router = APIRouter(prefix="/v1/speaker", tags=["speaker"], responses=ERROR_RESPONSES)

AudioFile = Annotated[UploadFile, File(description="WAV, FLAC or OGG/Vorbis.")]


@router.post("/score", summary="Compare voices with reference voices")
async def score(body: ScoreSpeakerBody, client: SpeakerDep) -> ScoreSpeakerReply:
    """Raw cosine and a reward per item, in order; a failed item has `error` instead of `score`."""
    return ScoreSpeakerReply.of(await client.score(**body.client_args()))


@router.post("/score-upload", summary="Compare one uploaded voice with an uploaded reference or a registered speaker")
async def score_upload(client: SpeakerDep, file: AudioFile,
                       reference_file: Annotated[UploadFile | None, File(description="Speech of the reference speaker.")] = None,
                       speaker_id: Annotated[str | None, Form(description="A registered speaker instead of reference_file.")] = None,
                       reward_mapping: Annotated[SimilarityMapping | None, Form()] = None) -> ScoreSpeakerReply:
    """The same reply as /score, for a single item sent as multipart/form-data."""
    reference = await uploaded_reference(reference_file, speaker_id)
    return ScoreSpeakerReply.of(await client.score(await uploaded_audios([file]), [reference], reward_mapping=reward_mapping))


@router.post("/embed", summary="Speaker embeddings of audios")
async def embed(body: EmbedBody, client: SpeakerDep) -> EmbedReply:
    """One embedding (float32 [D], L2-normalised) or error per audio, in order."""
    return EmbedReply.of(await client.embed(**body.client_args()))


@router.post("/embed-upload", summary="Speaker embeddings of uploaded audio files")
async def embed_upload(client: SpeakerDep, files: Annotated[list[UploadFile], File(description="One or more audio files.")]) -> EmbedReply:
    """The same reply as /embed, for files sent as multipart/form-data."""
    return EmbedReply.of(await client.embed(await uploaded_audios(files)))


@router.post("/register", summary="Store a named reference speaker")
async def register(body: RegisterBody, client: SpeakerDep) -> RegisterReply:
    """Later /score items may name it as speaker_id. Each scorer replica keeps its own speakers."""
    return RegisterReply.of(await client.register(**body.client_args()))


@router.post("/register-upload", summary="Store a named reference speaker from uploaded audio files")
async def register_upload(client: SpeakerDep, speaker_id: Annotated[str, Form(min_length=1)],
                          files: Annotated[list[UploadFile], File(description="One or more audio files of the speaker.")]) -> RegisterReply:
    """The same reply as /register, for files sent as multipart/form-data."""
    return RegisterReply.of(await client.register(speaker_id, await uploaded_audios(files)))
