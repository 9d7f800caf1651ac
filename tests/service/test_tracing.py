"""Tracing (SPEECHRL_TRACING): one trace from a gateway request through the client SDK to a real rules
server (and to token2wav and the ASR scorer), every span with the request id; and with the switch off, no
spans, no tracing SDK loaded, and a scorer and client that run without opentelemetry at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from speechrl.client import RuleRewardsClient, ServiceError
from speechrl.client._channel import Connection
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.logs import RequestIdMiddleware
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from speechrl.services.tracing import REQUEST_ID_ATTRIBUTE, HttpSpans
from tests.support.adapters import cosyvoice_payload
from tests.support.servers import serve_in_thread
from tests.support.tracing import ancestors, recording

ROOT = Path(__file__).resolve().parents[2]
ITEMS = [{"hypothesis": "the cat sat", "reference": "the cat sat on the mat"}]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the caller's trace, in its W3C traceparent
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"
RULES_RPC = "speechrl.v1.RuleRewards/ScoreRules"


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


def test_a_gateway_request_is_one_trace_down_to_the_rules_server(rules: str) -> None:
    with recording() as exporter:
        with TestClient(create_app(GatewayConfig(rules=rules, intelligibility="", speaker=""))) as client:
            reply = client.post("/v1/rules/score", json={"items": ITEMS},
                                headers={"x-request-id": "trace-me-1", "traceparent": TRACEPARENT})
        spans = exporter.get_finished_spans()
    assert reply.status_code == 200, reply.text
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}, [s.name for s in spans]
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert sorted(s.name for s in servers) == sorted(["POST /v1/rules/score", RULES_RPC])  # one per hop, no twin
    gateway = next(s for s in servers if s.name == "POST /v1/rules/score")
    scorer = next(s for s in servers if s.name == RULES_RPC)
    (call,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    # The caller's span -> the gateway's -> (FastAPI's endpoint span) -> the SDK's call -> the rules server's.
    assert gateway.parent is not None and gateway.parent.is_remote
    assert format(gateway.parent.span_id, "016x") == CALLER_SPAN_ID
    assert call.name == RULES_RPC and "POST /v1/rules/score" in ancestors(call, spans)
    assert scorer.parent is not None and scorer.parent.span_id == call.context.span_id and scorer.parent.is_remote
    assert scorer.attributes is not None and scorer.attributes["rpc.response.status_code"] == "OK"
    assert gateway.attributes is not None and gateway.attributes["http.response.status_code"] == 200
    for span in spans:
        assert span.attributes is not None and span.attributes.get(REQUEST_ID_ATTRIBUTE) == "trace-me-1", span.name


def test_the_token2wav_hop_and_its_asr_are_children_of_the_gateway_request() -> None:
    with serve_in_thread(lambda: start_token2wav(Token2WavConfig(port=free_port()))) as t2w, \
            serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as asr, \
            recording() as exporter:
        config = GatewayConfig(rules="", speaker="", token2wav=f"127.0.0.1:{t2w.port}",
                               intelligibility=f"127.0.0.1:{asr.port}")
        tokens = PhonemeVocabulary().text_to_ids("Turn on the lights.")
        with TestClient(create_app(config)) as client:
            reply = client.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens, "Turn on the lights."),
                                headers={"x-request-id": "trace-me-3"})
        spans = exporter.get_finished_spans()
    assert reply.status_code == 200, reply.text
    (gateway,) = [s for s in spans if s.kind == SpanKind.SERVER and s.name.startswith("POST ")]
    hops = [s for s in spans if s.kind == SpanKind.SERVER and s is not gateway]
    assert sorted(s.name.split("/")[0] for s in hops) == ["speechrl.v1.IntelligibilityScorer", "speechrl.v1.Token2Wav"]
    for hop in hops:
        assert ancestors(hop, spans)[-1] == gateway.name and hop.context.trace_id == gateway.context.trace_id
    assert {s.attributes.get(REQUEST_ID_ATTRIBUTE) for s in spans if s.attributes is not None} == {"trace-me-3"}


def test_a_refused_call_still_gets_its_server_span_with_the_code() -> None:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), auth_tokens="secret"))) as running, \
            recording() as exporter:
        with pytest.raises(ServiceError) as refused:
            RuleRewardsClient(f"127.0.0.1:{running.port}", token="wrong").score(["a"], ["a"])
        spans = exporter.get_finished_spans()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (call,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert server.parent is not None and server.parent.span_id == call.context.span_id
    assert server.attributes is not None and server.attributes["rpc.response.status_code"] == "UNAUTHENTICATED"
    assert server.status.status_code == StatusCode.UNSET  # the caller's fault, not the server's
    assert call.status.status_code == StatusCode.ERROR  # the caller's call failed


def test_without_fastapis_own_spans_the_middleware_opens_the_server_span() -> None:
    with recording() as exporter:
        app = FastAPI(telemetry={"tracing": False})  # as under a FastAPI older than 0.165

        @app.get("/ping/{name}")
        async def ping(name: str) -> dict[str, str]:
            return {"pong": name}

        app.add_middleware(HttpSpans)
        app.add_middleware(RequestIdMiddleware)
        with TestClient(app) as client:
            reply = client.get("/ping/x", headers={"x-request-id": "trace-me-2", "traceparent": TRACEPARENT})
        spans = exporter.get_finished_spans()
    assert reply.status_code == 200
    (server,) = spans
    assert server.name == "GET /ping/{name}" and server.kind == SpanKind.SERVER
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.attributes is not None and server.attributes[REQUEST_ID_ATTRIBUTE] == "trace-me-2"
    assert server.attributes["http.response.status_code"] == 200


def test_the_client_sends_traceparent_only_when_tracing_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = Connection("127.0.0.1:1")
    with TracerProvider().get_tracer("test").start_as_current_span("current"):  # someone else's span
        monkeypatch.delenv("SPEECHRL_TRACING", raising=False)
        assert "traceparent" not in dict(connection.call_metadata())
        monkeypatch.setenv("SPEECHRL_TRACING", "1")
        assert dict(connection.call_metadata())["traceparent"].startswith("00-")


def run_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SPEECHRL_", "OTEL_"))}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_off_by_default_no_span_and_no_tracing_sdk_in_the_gateway_and_the_scorer() -> None:
    out = run_python("""
        import sys
        from fastapi.testclient import TestClient
        from speechrl.services.gateway.config import GatewayConfig
        from speechrl.services.gateway.main import create_app
        from speechrl.services.ports import free_port
        from speechrl.services.rules.server import RulesConfig, start
        from tests.support.servers import serve_in_thread

        with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
            app = create_app(GatewayConfig(rules=f"127.0.0.1:{running.port}", intelligibility="", speaker=""))
            with TestClient(app) as client:
                reply = client.post("/v1/rules/score", json={"items": [{"hypothesis": "a", "reference": "a"}]})
        assert reply.status_code == 200, reply.text
        from opentelemetry import trace  # FastAPI and redis import the API themselves; the SDK's tracing is ours
        assert "opentelemetry.sdk.trace" not in sys.modules, "the tracing SDK was imported with tracing off"
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "a tracer provider was set"
        print("untraced")
    """)
    assert out.strip() == "untraced"


def test_the_scorer_and_the_client_run_without_opentelemetry_installed() -> None:
    out = run_python("""
        import asyncio, os, sys
        sys.modules["opentelemetry"] = None  # as if not installed: any import of it fails
        from speechrl.client import AsyncRuleRewardsClient
        from speechrl.services.ports import free_port
        from speechrl.services.rules.server import RulesConfig, start

        async def main():
            running = await start(RulesConfig(port=free_port()))
            os.environ["SPEECHRL_TRACING"] = "1"  # the client's switch on: without opentelemetry it sends no context
            async with AsyncRuleRewardsClient(f"127.0.0.1:{running.port}") as client:
                results = await client.score(["the cat"], ["the cat"])
            await running.stop(0)
            return results[0].score.wer

        print(asyncio.run(main()))
    """)
    assert float(out) == 0.0
