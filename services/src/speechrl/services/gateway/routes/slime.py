"""/v1/slime: slime's remote reward model (`--rm-type remote_rm --rm-url http://gateway:8000/v1/slime/rules`).

slime (THUDM/slime, `slime/rollout/rm_hub/__init__.py:remote_rm`, August 2026) POSTs one sample per
request, `{"prompt": ..., "response": ..., "label": ...}`, and takes the JSON reply as the reward;
it retries a failed request up to ten times with backoff, then fails the rollout. So the reply is
a bare number, and `?detail=true` answers `{"reward": ..., "scored": ..., <components>}` instead, for
slime's `--reward-key reward`. The scorers and their parameters are the OpenRLHF route's.

An unscorable sample gets `adapter_failure_reward`, as slime needs a number; a scorer that is down
answers that too, or 429/503/504 with `adapter_scorer_errors=http`, which slime's retry then covers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from speechrl.services.gateway.deps import ConfigDep, ScorersDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.inflight import limiter_of
from speechrl.services.gateway.samples import SampleScoringDep, score_samples
from speechrl.services.gateway.schemas.openrlhf import label_fields

router = APIRouter(prefix="/v1/slime", tags=["slime"], responses=ERROR_RESPONSES)


class SlimeRewardBody(BaseModel):
    """What slime's remote_rm sends: one sample."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "prompt": "<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n",
        "response": "turn on the light", "label": "turn on the lights"}]})

    prompt: Any = Field(default=None, description="The sample's prompt (text or chat messages); not scored.")
    response: str = Field(description="Required. The decoded response: text (rules) or speech tokens <|s_N|>.")
    # Required for the same reason as OpenRLHF's labels: without a reference every sample would be
    # adapter_failure_reward with status 200, which a run reads as real rewards.
    label: Any = Field(description='Required. The reference text, or {"reference", "keywords", "language"} (or its JSON).')


@router.post("/{scorer}", summary="slime remote reward: one number per sample")
async def slime_reward(
        scorer: Literal["reward", "rules", "token2wav_asr"], body: SlimeRewardBody, request: Request,
        scorers: ScorersDep, config: ConfigDep, how: SampleScoringDep,
        detail: Annotated[bool, Query(description="Answer {reward, scored, components} (for --reward-key reward) "
                                                  "instead of the bare number.")] = False,
) -> float | dict[str, float]:
    """The sample's reward; `label` holds the reference text (or {"reference", "keywords", "language"})."""
    with limiter_of(request).slot():
        scores = await score_samples(
            request, scorers, config, config.openrlhf_scorer if scorer == "reward" else scorer, [body.response],
            [label_fields(body.label)], how)
    if not detail:
        return scores.rewards[0]
    return {"reward": scores.rewards[0], "scored": 1.0 if scores.scored[0] else 0.0,
            **{name: values[0] for name, values in scores.components.items()}}
