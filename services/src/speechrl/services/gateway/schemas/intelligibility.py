"""JSON models of /v1/intelligibility: ASR transcript, WER/CER and a reward per utterance."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from speechrl.client import IntelligibilityResult
from speechrl.services.gateway.schemas.common import EXAMPLE_WAV_BASE64, AudioFields, ErrorCountsOut, ItemErrorOut

WerMapping = Literal["one_minus_wer", "one_minus_tanh_3wer", "negative_wer"]
ErrorUnit = Literal["word", "character", "pinyin"]  # gateway.config.ERROR_UNITS
ERROR_UNIT_HELP = ("What the rewarded error rate counts: word (unset), character, or pinyin (Mandarin syllables with "
                   "tones after Chinese text normalisation: CosyVoice2's GRPO recipe's metric).")


class IntelligibilityItemIn(AudioFields):
    """One utterance: its audio and what it should say."""

    reference_text: str = Field(description="What the speech should say.", examples=["the cat sat on the mat"])
    language: str = Field(default="", description="ISO 639-1 code; empty is the scorer's default (en).", examples=["en"])


class ScoreIntelligibilityBody(BaseModel):
    """A batch of utterances."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"audio_base64": EXAMPLE_WAV_BASE64, "reference_text": "the cat sat on the mat", "language": "en"}],
        "reward_mapping": "one_minus_wer"}]})

    items: list[IntelligibilityItemIn] = Field(min_length=1, description="At least one item.")
    reward_mapping: WerMapping | None = Field(
        default=None,
        description="one_minus_wer = clip(1 - wer, 0, 1); one_minus_tanh_3wer = clip(1 - tanh(3 wer), 0, 1); "
                    "negative_wer = -wer. Unset: the scorer's default.")
    error_unit: ErrorUnit | None = Field(default=None, description=ERROR_UNIT_HELP)

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of AsyncIntelligibilityClient.score."""
        return {"audios": [item.to_audio(f"items[{i}]") for i, item in enumerate(self.items)],
                "references": [item.reference_text for item in self.items],
                "language": [item.language for item in self.items], "reward_mapping": self.reward_mapping,
                "error_unit": self.error_unit}


class IntelligibilityScoreOut(BaseModel):
    """Transcript and error rates of one utterance."""

    model_config = ConfigDict(from_attributes=True)

    transcript: str = Field(description="The ASR transcript as the model wrote it.")
    normalized_transcript: str
    normalized_reference: str
    wer: float = Field(description="Word error rate on normalised words; >= 0, may exceed 1.")
    cer: float = Field(description="Character error rate on normalised text.")
    word_counts: ErrorCountsOut
    char_counts: ErrorCountsOut
    reward: float = Field(description="The reward under reward_mapping.")
    reward_mapping: str = Field(examples=["one_minus_wer"])
    audio_duration_seconds: float
    error_rate: float = Field(description="The error rate the reward came from, in error_unit.")
    error_unit: str = Field(examples=["word"])


class IntelligibilityResultOut(BaseModel):
    """A score or an error, never both."""

    model_config = ConfigDict(from_attributes=True)

    score: IntelligibilityScoreOut | None = None
    error: ItemErrorOut | None = None


class ScoreIntelligibilityReply(BaseModel):
    """One result per request item, in order."""

    results: list[IntelligibilityResultOut]

    @classmethod
    def of(cls, results: list[IntelligibilityResult]) -> ScoreIntelligibilityReply:
        return cls(results=[IntelligibilityResultOut.model_validate(r) for r in results])
