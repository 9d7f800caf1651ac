"""/v1/intelligibility: transcribe speech and score it against a reference text."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from speechrl.services.gateway.deps import IntelligibilityDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.schemas.common import uploaded_audios
from speechrl.services.gateway.schemas.intelligibility import (
    ERROR_UNIT_HELP,
    ErrorUnit,
    ScoreIntelligibilityBody,
    ScoreIntelligibilityReply,
    WerMapping,
)

router = APIRouter(prefix="/v1/intelligibility", tags=["intelligibility"], responses=ERROR_RESPONSES)


@router.post("/score", summary="Score a batch of utterances (audio as base64 or PCM)")
async def score(body: ScoreIntelligibilityBody, client: IntelligibilityDep) -> ScoreIntelligibilityReply:
    """Transcript, WER/CER and a reward per item, in order; a failed item has `error` instead of `score`."""
    return ScoreIntelligibilityReply.of(await client.score(**body.client_args()))


@router.post("/score-upload", summary="Score one uploaded audio file")
async def score_upload(client: IntelligibilityDep,
                       file: Annotated[UploadFile, File(description="WAV, FLAC or OGG/Vorbis.")],
                       reference_text: Annotated[str, Form(description="What the speech should say.")],
                       language: Annotated[str, Form(description="ISO 639-1 code; empty means en.")] = "",
                       reward_mapping: Annotated[WerMapping | None, Form()] = None,
                       error_unit: Annotated[ErrorUnit | None, Form(description=ERROR_UNIT_HELP)] = None,
                       ) -> ScoreIntelligibilityReply:
    """The same reply as /score, for a single item sent as multipart/form-data."""
    return ScoreIntelligibilityReply.of(
        await client.score(await uploaded_audios([file]), [reference_text], language=language,
                           reward_mapping=reward_mapping, error_unit=error_unit))
