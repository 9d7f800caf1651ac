"""Every limit of a server refuses with an error that names it, and the server keeps serving.

max_message_mb (gRPC's own check), max_request_items, max_text_chars (rules and intelligibility),
max_audio_seconds, max_queue_items and max_concurrent_requests; the last two shed load with
RESOURCE_EXHAUSTED and a retry-after-ms hint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.v1 import common_pb2, rule_rewards_pb2, rule_rewards_pb2_grpc
from speechrl.v1 import intelligibility_pb2 as ipb
from speechrl.v1 import intelligibility_pb2_grpc as ipb_grpc
from tests.support.servers import serve_in_thread

ITEM = rule_rewards_pb2.RuleRewardItem(hypothesis="the cat sat", reference="the cat sat")


def still_serves(channel: grpc.Channel) -> None:
    reply = rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(
        rule_rewards_pb2.ScoreRulesRequest(items=[ITEM]), timeout=10)
    assert reply.results[0].score.wer == 0.0


@pytest.fixture(scope="module")
def rules() -> Iterator[grpc.Channel]:
    config = RulesConfig(port=free_port(), max_message_mb=1, max_request_items=4, max_text_chars=100)
    with serve_in_thread(lambda: start_rules(config)) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}",
                                   options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]) as channel:
            yield channel


def test_max_message_mb(rules: grpc.Channel) -> None:
    big = rule_rewards_pb2.RuleRewardItem(hypothesis="x" * (2 * 1024 * 1024), reference="x")
    with pytest.raises(grpc.RpcError) as info:
        rule_rewards_pb2_grpc.RuleRewardsStub(rules).ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[big]), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    still_serves(rules)


def test_max_request_items(rules: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        rule_rewards_pb2_grpc.RuleRewardsStub(rules).ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[ITEM] * 5), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 5 items" in info.value.details() and "max_request_items" in info.value.details()
    still_serves(rules)


def test_max_text_chars_of_rules(rules: grpc.Channel) -> None:
    long_item = rule_rewards_pb2.RuleRewardItem(hypothesis="a " * 60, reference="a")
    reply = rule_rewards_pb2_grpc.RuleRewardsStub(rules).ScoreRules(
        rule_rewards_pb2.ScoreRulesRequest(items=[long_item, ITEM]), timeout=10)
    error = reply.results[0].error
    assert error.code == common_pb2.ITEM_ERROR_CODE_TEXT_TOO_LONG and error.field == "items[0].hypothesis"
    assert "max_text_chars of 100" in error.message
    assert reply.results[1].score.wer == 0.0  # its neighbour is scored
    still_serves(rules)


def pcm(seconds: float) -> common_pb2.Audio:
    samples = (0.05 * np.sin(np.arange(int(16000 * seconds)) / 5)).astype("<f4")
    return common_pb2.Audio(pcm=common_pb2.RawPcm(data=samples.tobytes(), sample_rate_hertz=16000,
                                                  encoding=common_pb2.PCM_F32LE))


def test_max_audio_seconds_and_max_text_chars_of_intelligibility() -> None:
    config = IntelligibilityConfig(port=free_port(), max_audio_seconds=2.0, max_text_chars=50)

    with serve_in_thread(lambda: start_intelligibility(config)) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = ipb_grpc.IntelligibilityScorerStub(channel)
        reply = stub.ScoreIntelligibility(ipb.ScoreIntelligibilityRequest(items=[
            ipb.IntelligibilityItem(audio=pcm(3.0), reference_text="hello"),
            ipb.IntelligibilityItem(audio=pcm(1.0), reference_text="hello " * 20),
            ipb.IntelligibilityItem(audio=pcm(1.0), reference_text="hello")]), timeout=60)
    too_long, too_much_text, fine = reply.results
    assert too_long.error.code == common_pb2.ITEM_ERROR_CODE_AUDIO_TOO_LONG and too_long.error.field == "items[0].audio"
    assert "max_audio_seconds of 2 s" in too_long.error.message
    assert too_much_text.error.code == common_pb2.ITEM_ERROR_CODE_TEXT_TOO_LONG
    assert too_much_text.error.field == "items[1].reference_text" and "max_text_chars of 50" in too_much_text.error.message
    assert fine.WhichOneof("outcome") == "score"


async def _concurrent_calls(port: int, n: int, call: Callable[[grpc.aio.Channel], Awaitable[Any]] | None = None) -> list[Any]:
    """n calls at once on one channel (ScoreRules of ITEM unless `call` says otherwise); each outcome
    is its reply or its AioRpcError."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

        async def one() -> Any:
            try:
                if call is not None:
                    return await call(channel)
                return await rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(
                    rule_rewards_pb2.ScoreRulesRequest(items=[ITEM]), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc

        return await asyncio.gather(*(one() for _ in range(n)))


def trailer(error: grpc.aio.AioRpcError, key: str) -> str | None:
    return next((v for k, v in (error.trailing_metadata() or ()) if k == key), None)  # type: ignore[misc]


def test_max_concurrent_requests_sheds_with_a_retry_hint() -> None:
    # The first call holds its slot while its batch waits 300 ms for company; the others find none free.
    # A batch waits only while smaller than the one before, so a first request of 5 items sets that up.
    config = RulesConfig(port=free_port(), max_concurrent_requests=1, max_wait_ms=300)
    with serve_in_thread(lambda: start_rules(config)) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(
                rule_rewards_pb2.ScoreRulesRequest(items=[ITEM] * 5), timeout=10)
        outcomes = asyncio.run(_concurrent_calls(running.port, 5))
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(refused) == 4 and len(outcomes) - len(refused) == 1
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_requests: 1 calls already in flight" in (error.details() or "")
            assert trailer(error, "retry-after-ms") == "100" and trailer(error, "x-request-id")
        assert running.interceptor.in_flight == 0 and running.interceptor.refused_busy == 4
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            still_serves(channel)


def test_max_queue_items_sheds_with_a_retry_hint() -> None:
    # Whisper holds the first item for a while in its model thread; calls arriving meanwhile find the
    # queue (max_queue_items 1) full.
    config = IntelligibilityConfig(port=free_port(), max_queue_items=1)
    item = ipb.IntelligibilityItem(audio=pcm(1.5), reference_text="hello")

    def call(channel: grpc.aio.Channel) -> Awaitable[ipb.ScoreIntelligibilityResponse]:
        return ipb_grpc.IntelligibilityScorerStub(channel).ScoreIntelligibility(
            ipb.ScoreIntelligibilityRequest(items=[item]), timeout=60)

    with serve_in_thread(lambda: start_intelligibility(config)) as running:
        outcomes = asyncio.run(_concurrent_calls(running.port, 4, call))
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert refused and len(refused) < 4
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_items 1" in (error.details() or "")
            assert trailer(error, "retry-after-ms") == "200"
            assert trailer(error, "x-request-id")  # the interceptor's trailer survives the servicer's
        answered = asyncio.run(_concurrent_calls(running.port, 1, call))[0]
        assert isinstance(answered, ipb.ScoreIntelligibilityResponse)  # the server keeps serving
