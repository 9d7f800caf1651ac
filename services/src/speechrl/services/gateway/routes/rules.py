"""/v1/rules: the ASR paper's text-only rewards, through the rule-reward service."""

from __future__ import annotations

from fastapi import APIRouter

from speechrl.services.gateway.deps import RulesDep
from speechrl.services.gateway.errors import ERROR_RESPONSES
from speechrl.services.gateway.schemas.rules import ScoreRulesBody, ScoreRulesReply

router = APIRouter(prefix="/v1/rules", tags=["rules"], responses=ERROR_RESPONSES)


@router.post("/score", summary="Score ASR hypotheses: R1 accuracy, R2 hallucination, R3 keywords")
async def score_rules(body: ScoreRulesBody, client: RulesDep) -> ScoreRulesReply:
    """One result per item, in order; an item that cannot be scored has `error` instead of `score`."""
    return ScoreRulesReply.of(await client.score(**body.client_args()))
