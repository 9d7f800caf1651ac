"""The core of the routes that score trainer samples (OpenRLHF, slime): decoded completions against labels.

A completion is the decoded response; a label is the reference text or {"reference", "keywords",
"language"} (`schemas.openrlhf.label_fields`). The scorer is rules (the completion's text) or
token2wav_asr (its speech tokens <|s_N|> -> audio -> intelligibility).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from speechrl.adapters.inputs import parse_speech_tokens
from speechrl.adapters.openrlhf import RULE_COMPONENTS, SPEECH_COMPONENTS, text_of
from speechrl.adapters.scoring import RuleWeights
from speechrl.services.gateway import scoring
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.deps import Scorers
from speechrl.services.gateway.schemas.intelligibility import ERROR_UNIT_HELP, ErrorUnit, WerMapping


@dataclass
class SampleScoring:
    """How the sample routes score: their query parameters (FastAPI reads each field as one)."""

    accuracy_weight: Annotated[float | None, Query(description="rules: weight of R1; default 1.")] = None
    hallucination_weight: Annotated[float | None, Query(description="rules: weight of R2; default 1.")] = None
    keyword_weight: Annotated[float | None, Query(description="rules: weight of R3; default 0.")] = None
    reward_mapping: Annotated[WerMapping, Query(description="token2wav_asr: WER -> reward.")] = "one_minus_tanh_3wer"
    language: Annotated[str, Query(description="ISO 639-1 code for labels that give none; empty is en.")] = ""
    error_unit: Annotated[ErrorUnit | None, Query(description="token2wav_asr: " + ERROR_UNIT_HELP)] = None


SampleScoringDep = Annotated[SampleScoring, Depends()]


async def score_samples(request: Request, scorers: Scorers, config: GatewayConfig, name: str, completions: list[str],
                        labels: list[tuple[str | None, list[str], str]], how: SampleScoring) -> scoring.ItemScores:
    """Rewards of decoded completions against their labels (reference, keywords, language) with the scorer
    `name`: rules (the completion's text) or token2wav_asr (its speech tokens)."""
    references, keywords, languages = zip(*labels, strict=True)
    default_language = how.language or (config.token2wav_asr_language if name == "token2wav_asr" else "")
    languages = tuple(lang or default_language for lang in languages)
    if name == "rules":
        weights = RuleWeights(how.accuracy_weight, how.hallucination_weight, how.keyword_weight)
        outcomes = await scoring.rules(scorers, config, [text_of(c) for c in completions], list(references),
                                       keywords=list(keywords), languages=list(languages), weights=weights)
        components: tuple[str, ...] = RULE_COMPONENTS
    else:
        outcomes = await scoring.speech_tokens(request.app.state, scorers, config,
                                               [parse_speech_tokens(c) for c in completions], list(references),
                                               languages=list(languages), reward_mapping=how.reward_mapping,
                                               error_unit=how.error_unit or config.token2wav_asr_error_unit)
        components = SPEECH_COMPONENTS
    return scoring.ItemScores.of(outcomes, config.adapter_failure_reward, components)
