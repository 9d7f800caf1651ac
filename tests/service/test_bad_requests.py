"""Answers to callers' mistakes that must not look like server faults (issue 21): bytes that are not the
method's message end INVALID_ARGUMENT naming it (gRPC's own answer is UNKNOWN), and a second server on a
taken port fails at start naming the port and its holder instead of sharing the port's connections."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.v1 import rule_rewards_pb2, rule_rewards_pb2_grpc
from tests.support.servers import serve_in_thread

SCORE = "/speechrl.v1.RuleRewards/ScoreRules"


def test_bytes_that_are_not_a_request_are_invalid_argument() -> None:
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port()))) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        raw = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            raw(b"\xff\xff\xff\xff not a protobuf", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert SCORE in refused.value.details() and "speechrl.v1.ScoreRulesRequest" in refused.value.details()
        # The server is still up and scores the next good request.
        reply = rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(rule_rewards_pb2.ScoreRulesRequest(
            items=[rule_rewards_pb2.RuleRewardItem(hypothesis="the cat", reference="the cat")]), timeout=10)
        assert reply.results[0].WhichOneof("outcome") == "score"


def test_a_second_server_on_a_taken_port_is_refused() -> None:
    port = free_port()
    with serve_in_thread(lambda: start_rules(RulesConfig(port=port))):
        second = subprocess.run([sys.executable, "-m", "speechrl.services.cli", "serve", "rules", "--port", str(port)],
                                capture_output=True, text=True, timeout=120)
    assert second.returncode != 0
    assert f"port {port} is taken by pid" in second.stderr, second.stderr[-2000:]
