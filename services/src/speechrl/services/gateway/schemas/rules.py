"""JSON models of /v1/rules: the ASR paper's text rewards (R1 accuracy, R2 hallucination, R3 keywords)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from speechrl.client import RuleResult
from speechrl.services.gateway.schemas.common import ErrorCountsOut, ItemErrorOut


class RuleItemIn(BaseModel):
    """One ASR hypothesis to score against its reference."""

    hypothesis: str = Field(description="The ASR model's output; may be empty (a full deletion).", examples=["the cat sat"])
    reference: str = Field(description="The ground-truth transcript.", examples=["the cat sat on the mat"])
    keywords: list[str] = Field(default_factory=list, description="Keywords or phrases for R3; none gives R3 = 1.",
                                examples=[["cat", "mat"]])
    language: str = Field(default="", description="ISO 639-1 code of the reference; empty means en.", examples=["en"])


class RuleWeightsIn(BaseModel):
    """Weights of total = accuracy * R1 + hallucination * R2 + keyword * R3; unset ones keep their defaults."""

    accuracy: float | None = Field(default=None, description="Weight of R1; default 1.", examples=[1.0])
    hallucination: float | None = Field(default=None, description="Weight of R2; default 1.", examples=[1.0])
    keyword: float | None = Field(default=None, description="Weight of R3; default 0.", examples=[0.5])

    @field_validator("accuracy", "hallucination", "keyword")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class ScoreRulesBody(BaseModel):
    """A batch of hypotheses."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"hypothesis": "the cat sat", "reference": "the cat sat on the mat", "keywords": ["mat"]}],
        "weights": {"keyword": 0.5}}]})

    items: list[RuleItemIn] = Field(min_length=1, description="At least one item.")
    weights: RuleWeightsIn | None = Field(default=None, description="Unset: the default weights (1, 1, 0).")

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of AsyncRuleRewardsClient.score."""
        weights = self.weights or RuleWeightsIn()
        return {"hypotheses": [i.hypothesis for i in self.items], "references": [i.reference for i in self.items],
                "keywords": [i.keywords for i in self.items], "language": [i.language for i in self.items],
                "accuracy_weight": weights.accuracy, "hallucination_weight": weights.hallucination,
                "keyword_weight": weights.keyword}


class RuleScoreOut(BaseModel):
    """Every reward component of one hypothesis."""

    model_config = ConfigDict(from_attributes=True)

    wer: float = Field(description="Word error rate on normalised text; >= 0, may exceed 1.")
    word_counts: ErrorCountsOut
    accuracy_reward: float = Field(description="R1 = clip(1 - wer, 0, 1).")
    hallucination_reward: float = Field(description="R2 = -1 when a hallucination rule fired, else 0.")
    hallucination_reasons: list[str] = Field(description="The rules that fired, e.g. repeated_ngram.")
    keyword_precision: float
    keyword_recall: float
    keyword_reward: float = Field(description="R3 = (keyword_precision + keyword_recall) / 2.")
    total: float = Field(description="The weighted total.")


class RuleResultOut(BaseModel):
    """A score or an error, never both."""

    model_config = ConfigDict(from_attributes=True)

    score: RuleScoreOut | None = None
    error: ItemErrorOut | None = None


class ScoreRulesReply(BaseModel):
    """One result per request item, in order."""

    results: list[RuleResultOut]

    @classmethod
    def of(cls, results: list[RuleResult]) -> ScoreRulesReply:
        return cls(results=[RuleResultOut.model_validate(r) for r in results])
