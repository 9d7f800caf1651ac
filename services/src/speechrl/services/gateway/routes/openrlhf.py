"""/v1/openrlhf: OpenRLHF's remote reward model (`--reward.remote_url http://gateway:8000/v1/openrlhf/rules`).

The scorer is chosen by the path: `rules` (ASR: the completion's text against the label's reference)
or `token2wav_asr` (TTS: speech tokens <|s_N|> in the completion -> audio -> intelligibility against
the label); `reward` is the one set by `openrlhf_scorer`. Query parameters tune it: the rule
weights, the WER reward mapping, a default language.

Each request is one call on the gateway's shared scorer channel, so OpenRLHF's one-sample requests
are batched by the scorer's dynamic batcher; at most `max_inflight_requests` are answered at once
(429 with Retry-After past it). A sample that cannot be scored gets `adapter_failure_reward` with
`extra_logs.scored = 0`, because OpenRLHF's trainer needs a number for every sample.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request

from speechrl.adapters.common import RuleWeights
from speechrl.services.gateway.deps import ConfigDep, ScorersDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.inflight import limiter_of
from speechrl.services.gateway.samples import score_samples
from speechrl.services.gateway.schemas.intelligibility import ERROR_UNIT_HELP, ErrorUnit, WerMapping
from speechrl.services.gateway.schemas.openrlhf import OpenRLHFRewardBody, OpenRLHFRewardReply

router = APIRouter(prefix="/v1/openrlhf", tags=["openrlhf"], responses=ERROR_RESPONSES)


@router.post("/{scorer}", summary="OpenRLHF remote reward: rewards, scores and extra_logs per query")
async def openrlhf_reward(
        scorer: Literal["reward", "rules", "token2wav_asr"], body: OpenRLHFRewardBody, request: Request,
        scorers: ScorersDep, config: ConfigDep,
        accuracy_weight: Annotated[float | None, Query(description="rules: weight of R1; default 1.")] = None,
        hallucination_weight: Annotated[float | None, Query(description="rules: weight of R2; default 1.")] = None,
        keyword_weight: Annotated[float | None, Query(description="rules: weight of R3; default 0.")] = None,
        reward_mapping: Annotated[WerMapping, Query(description="token2wav_asr: WER -> reward.")] = "one_minus_tanh_3wer",
        language: Annotated[str, Query(description="ISO 639-1 code for labels that give none; empty is en.")] = "",
        error_unit: Annotated[ErrorUnit | None, Query(description="token2wav_asr: " + ERROR_UNIT_HELP)] = None,
) -> OpenRLHFRewardReply:
    """One reward per query, in order; `labels` hold the reference text (or {"reference", "keywords", "language"})."""
    with limiter_of(request).slot():
        scores = await score_samples(
            request, scorers, config, config.openrlhf_scorer if scorer == "reward" else scorer, body.completions(),
            body.label_fields(), weights=RuleWeights(accuracy_weight, hallucination_weight, keyword_weight),
            reward_mapping=reward_mapping, language=language, error_unit=error_unit)
    return OpenRLHFRewardReply.of(scores)
