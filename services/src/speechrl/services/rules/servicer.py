"""RuleRewards servicer: translates proto messages to RuleItems and results back."""

from __future__ import annotations

import math

import grpc

from speechrl.rewards import RuleRewardResult
from speechrl.services.batching import DynamicBatcher
from speechrl.services.errors import ItemFailure, RequestInvalid
from speechrl.services.rules.engine import RuleItem, weighted_config
from speechrl.services.servicing import check_count, grpc_method, item_error, wer_mapping_name
from speechrl.v1 import common_pb2, rule_rewards_pb2, rule_rewards_pb2_grpc


def _score_proto(result: RuleRewardResult) -> rule_rewards_pb2.RuleRewardScore:
    c = result.word_counts
    return rule_rewards_pb2.RuleRewardScore(
        wer=result.wer,
        word_counts=common_pb2.ErrorCounts(hits=c.hits, substitutions=c.substitutions,
                                           insertions=c.insertions, deletions=c.deletions),
        accuracy_reward=result.accuracy_reward, hallucination_reward=result.hallucination_reward,
        hallucination_reasons=result.hallucination_reasons, keyword_precision=result.keyword_precision,
        keyword_recall=result.keyword_recall, keyword_reward=result.keyword_reward, total=result.total)


class RuleRewardsServicer(rule_rewards_pb2_grpc.RuleRewardsServicer):
    """gRPC face of the rule-reward engine."""

    def __init__(self, batcher: DynamicBatcher[RuleItem, RuleRewardResult], max_request_items: int):
        self.batcher = batcher
        self.max_request_items = max_request_items

    @grpc_method
    async def ScoreRules(self, request: rule_rewards_pb2.ScoreRulesRequest,
                         context: grpc.aio.ServicerContext) -> rule_rewards_pb2.ScoreRulesResponse:
        check_count(request.items, "items", self.max_request_items)
        w = request.weights
        weights = {name: (getattr(w, name) if w.HasField(name) else None) for name in ("accuracy", "hallucination", "keyword")}
        for name, value in weights.items():
            if value is not None and not math.isfinite(value):
                raise RequestInvalid(f"weights.{name}", f"must be finite, got {value}")
        floor = request.accuracy_floor if request.HasField("accuracy_floor") else None
        if floor is not None and not -10.0 <= floor <= 0.0:  # also refuses NaN
            raise RequestInvalid("accuracy_floor", f"must be in [-10, 0] (0: the paper's clip), got {floor}")
        config = weighted_config(**weights, accuracy_mapping=wer_mapping_name(
            request.accuracy_mapping, "accuracy_mapping", "one_minus_wer"), accuracy_floor=floor)
        items = [RuleItem(i.hypothesis, i.reference, tuple(i.keywords), i.language or "en", config) for i in request.items]
        results = await self.batcher.submit(items)
        response = rule_rewards_pb2.ScoreRulesResponse()
        for index, result in enumerate(results):
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result.at(f"items[{index}]")))
            else:
                response.results.add(score=_score_proto(result))
        return response
