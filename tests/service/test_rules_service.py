"""The rule-reward gRPC server on loopback: answers, per-item errors, malformed requests, status."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from speechrl.client import RuleRewardsClient
from speechrl.rewards import rule_rewards
from speechrl.services.ports import free_port
from speechrl.services.rules.engine import RuleItem, RuleRewardEngine
from speechrl.services.rules.server import RulesConfig, start
from speechrl.v1 import common_pb2, common_pb2_grpc, rule_rewards_pb2, rule_rewards_pb2_grpc
from tests.support.servers import serve_in_thread


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    config = RulesConfig(port=free_port(), max_request_items=8, max_text_chars=200)
    with serve_in_thread(lambda: start(config)) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


def item(hyp: str, ref: str, keywords: tuple[str, ...] = ()) -> rule_rewards_pb2.RuleRewardItem:
    return rule_rewards_pb2.RuleRewardItem(hypothesis=hyp, reference=ref, keywords=list(keywords))


def test_scores_equal_the_local_functions(channel: grpc.Channel) -> None:
    stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
    pairs = [("the cat sat on a mat", "the cat sat on the mat"), ("go go go go go go", "go home"),
             ("deploy grafana now", "deploy redis now")]
    reply = stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(
        items=[item(h, r, ("redis", "grafana")) for h, r in pairs],
        weights=rule_rewards_pb2.RuleRewardWeights(keyword=1.0)))
    for (hyp, ref), result in zip(pairs, reply.results, strict=True):
        local = rule_rewards(hyp, ref, ("redis", "grafana"))
        score = result.score
        assert score.wer == pytest.approx(local.wer)
        assert score.hallucination_reward == local.hallucination_reward
        assert list(score.hallucination_reasons) == local.hallucination_reasons
        assert score.keyword_reward == pytest.approx(local.keyword_reward)
        assert score.total == pytest.approx(local.accuracy_reward + local.hallucination_reward + local.keyword_reward)


def test_bad_items_fail_alone(channel: grpc.Channel) -> None:
    stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
    reply = stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[
        item("fine", "fine"), item("x", "   "), item("x", "y" * 500), item("x", "?!")]))
    assert reply.results[0].score.wer == 0.0
    assert reply.results[1].error.code == common_pb2.ITEM_ERROR_CODE_EMPTY_TEXT
    assert reply.results[1].error.field == "items[1].reference"
    assert reply.results[2].error.code == common_pb2.ITEM_ERROR_CODE_TEXT_TOO_LONG
    assert reply.results[3].error.code == common_pb2.ITEM_ERROR_CODE_EMPTY_TEXT
    assert "empty after normalisation" in reply.results[3].error.message


@pytest.mark.parametrize("request_, field", [
    (rule_rewards_pb2.ScoreRulesRequest(), "items"),
    (rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")] * 9), "items"),
    (rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")],
                                        weights=rule_rewards_pb2.RuleRewardWeights(accuracy=float("nan"))),
     "weights.accuracy"),
    (rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")], accuracy_floor=0.5), "accuracy_floor"),
    (rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")], accuracy_floor=float("nan")), "accuracy_floor"),
    (rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")], accuracy_mapping=7), "accuracy_mapping"),  # type: ignore[arg-type]
])
def test_malformed_requests_are_invalid_argument_naming_the_field(channel: grpc.Channel, request_, field: str) -> None:
    stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.ScoreRules(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    assert stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[item("a", "a")])).results[0].score.wer == 0.0


def test_r1_takes_the_requests_mapping_and_floor(channel: grpc.Channel, address: str) -> None:
    """A negative floor reaches R1 and the total; unset, R1 is the paper's clip (the two requests differ
    only in the floor). The mapping comes through the SDK's name for it, as the trainer sends it."""
    stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
    looped, ref = "go home now " * 4, "go home now"  # WER 3
    clipped, floored = (stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[item(looped, ref)], **extra)).results[0].score
                        for extra in ({}, {"accuracy_floor": -1.0}))
    assert (clipped.wer, clipped.accuracy_reward, floored.accuracy_reward) == (3.0, 0.0, -1.0)
    assert floored.total == pytest.approx(clipped.total - 1.0)
    with RuleRewardsClient(address) as client:
        tanh = client.score(["go home"], [ref], accuracy_mapping="one_minus_tanh_3wer", accuracy_floor=-1.0)[0].score
    assert tanh is not None and tanh.accuracy_reward == pytest.approx(1 - math.tanh(1.0))


def test_health_reflection_and_status(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "speechrl.v1.RuleRewards"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"speechrl.v1.RuleRewards", "speechrl.v1.ServiceStatus", "grpc.health.v1.Health"} <= names
    status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(common_pb2.GetServiceStatusRequest())
    assert status.service == "speechrl.v1.RuleRewards" and status.batching.max_batch_size == 32
    assert status.items_processed > 0 and status.version


def test_a_batch_shares_work_without_changing_any_score() -> None:
    # A GRPO group: G samples of one prompt, some identical, all against one reference.
    reference = "Please call Stella and ask her to bring these things with her from the store."
    hypotheses = ["please call stella and ask her to bring these things", "please call stella",
                  "please call stella", "bring these things bring these things bring these things"]
    engine = RuleRewardEngine()
    together = engine.score_batch([RuleItem(h, reference) for h in hypotheses])
    for hypothesis, result in zip(hypotheses, together, strict=True):
        assert result == rule_rewards(hypothesis, reference)  # as if scored alone, outside any batch
    assert together[1] is together[2]  # the repeated sample was scored once
