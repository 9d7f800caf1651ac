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

from typing import Literal

from fastapi import APIRouter, Request

from speechrl.services.gateway.deps import ConfigDep, ScorersDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.inflight import limiter_of
from speechrl.services.gateway.samples import SampleScoringDep, score_samples
from speechrl.services.gateway.schemas.openrlhf import OpenRLHFRewardBody, OpenRLHFRewardReply

router = APIRouter(prefix="/v1/openrlhf", tags=["openrlhf"], responses=ERROR_RESPONSES)


@router.post("/{scorer}", summary="OpenRLHF remote reward: rewards, scores and extra_logs per query")
async def openrlhf_reward(
        scorer: Literal["reward", "rules", "token2wav_asr"], body: OpenRLHFRewardBody, request: Request,
        scorers: ScorersDep, config: ConfigDep, how: SampleScoringDep,
) -> OpenRLHFRewardReply:
    """One reward per query, in order; `labels` hold the reference text (or {"reference", "keywords", "language"})."""
    with limiter_of(request).slot():
        scores = await score_samples(
            request, scorers, config, config.openrlhf_scorer if scorer == "reward" else scorer, body.completions(),
            body.label_fields(), how)
    return OpenRLHFRewardReply.of(scores)
