"""Observability: one request id from the gateway to the scorer's log lines and back, JSON logs,
and per-RPC Prometheus counters and latency histograms of a scorer by method and code."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.logs import JsonFormatter, RequestIdFilter, configure_logging
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from speechrl.v1 import rule_rewards_pb2, rule_rewards_pb2_grpc
from tests.support.servers import serve_in_thread

METHOD = "/speechrl.v1.RuleRewards/ScoreRules"


@pytest.fixture(scope="module")
def rules() -> Iterator[tuple[str, int]]:
    config = RulesConfig(port=free_port(), metrics_port=free_port())
    with serve_in_thread(lambda: start(config)) as running:
        yield f"127.0.0.1:{running.port}", config.metrics_port


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every log record (DEBUG and up) of this process as JSON lines, the way `--log-format json` writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_request_id_follows_a_call_from_gateway_to_scorer(rules: tuple[str, int], json_lines: io.StringIO) -> None:
    endpoint, _ = rules
    body = {"items": [{"hypothesis": "the cat sat", "reference": "the cat sat"}]}
    with TestClient(create_app(GatewayConfig(rules=endpoint, intelligibility="", speaker=""))) as client:
        given = client.post("/v1/rules/score", json=body, headers={"x-request-id": "trainer-step-42"})
        made = client.post("/v1/rules/score", json=body)
    assert given.status_code == 200 and given.headers["x-request-id"] == "trainer-step-42"
    new_id = made.headers["x-request-id"]
    assert len(new_id) == 32 and new_id != "trainer-step-42"
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    for request_id in ("trainer-step-42", new_id):
        loggers = {line["logger"] for line in lines if line["request_id"] == request_id}
        # The gateway's access line and the scorer's per-call line carry the same id.
        assert {"speechrl.access", "speechrl.services.interceptor"} <= loggers, (request_id, loggers)
    scorer_line = next(line for line in lines if line["request_id"] == "trainer-step-42"
                       and line["logger"] == "speechrl.services.interceptor")
    assert METHOD in scorer_line["message"] and "OK" in scorer_line["message"]


def test_scorer_returns_the_request_id_in_trailing_metadata(rules: tuple[str, int]) -> None:
    endpoint, _ = rules
    with grpc.insecure_channel(endpoint) as channel:
        stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
        request = rule_rewards_pb2.ScoreRulesRequest(items=[rule_rewards_pb2.RuleRewardItem(hypothesis="a", reference="a")])
        _, call = stub.ScoreRules.with_call(request, metadata=(("x-request-id", "abc-1"),), timeout=10)
        assert dict(call.trailing_metadata())["x-request-id"] == "abc-1"
        _, call = stub.ScoreRules.with_call(request, metadata=(("x-request-id", "bad id " + "x" * 200),), timeout=10)
        assert len(dict(call.trailing_metadata())["x-request-id"]) == 32  # an unusable id is replaced


def grpc_count(text: str, method: str, code: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "speechrl_grpc_requests_total" and sample.labels == {"method": method, "code": code}:
                return float(sample.value)
    return 0.0


def test_scorer_metrics_count_requests_by_method_and_code(rules: tuple[str, int]) -> None:
    endpoint, metrics_port = rules
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    before = httpx.get(url, timeout=10).text
    with grpc.insecure_channel(endpoint) as channel:
        stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
        ok = rule_rewards_pb2.ScoreRulesRequest(items=[rule_rewards_pb2.RuleRewardItem(hypothesis="a", reference="a")])
        for _ in range(3):
            stub.ScoreRules(ok, timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(), timeout=10)
    after = httpx.get(url, timeout=10).text
    assert grpc_count(after, METHOD, "OK") - grpc_count(before, METHOD, "OK") == 3
    assert grpc_count(after, METHOD, "INVALID_ARGUMENT") - grpc_count(before, METHOD, "INVALID_ARGUMENT") == 1
    assert f'speechrl_grpc_request_seconds_count{{method="{METHOD}"}}' in after
    assert "speechrl_batch_size" in after or "speechrl_items_total" in after  # the batcher's metrics, same endpoint


def test_configure_logging_writes_json_with_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json")
        from speechrl.client import REQUEST_ID

        token = REQUEST_ID.set("rid-7")
        logging.getLogger("speechrl.test").info("scored %d items", 3, extra={"batch": 3})
        REQUEST_ID.reset(token)
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert line["message"] == "scored 3 items" and line["request_id"] == "rid-7" and line["batch"] == 3
    with pytest.raises(ValueError, match="text or json"):
        configure_logging("xml")
