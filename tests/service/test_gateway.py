"""The REST gateway in front of the real scorers: same numbers as gRPC, HTTP errors, health, metrics, docs."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from speechrl.client import AsyncIntelligibilityClient, AsyncSpeakerClient, ServiceError, SpeakerId
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.errors import service_error_response
from speechrl.services.gateway.main import create_app
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from speechrl.v1 import rule_rewards_pb2, rule_rewards_pb2_grpc
from tests.support.servers import Speech, serve_in_thread, uvicorn_in_thread

ITEMS: list[dict[str, Any]] = [
    {"hypothesis": "the cat sat", "reference": "the cat sat on the mat", "keywords": ["mat"]},
    {"hypothesis": "hello hello hello hello hello hello", "reference": "hello world"},
    {"hypothesis": "anything", "reference": ""}]


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def strict_rules() -> Iterator[str]:
    """A real rules server that takes at most 2 items per request and sheds any request of 2 (queue of 1)."""
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_request_items=2, max_queue_items=1))) as running:
        yield f"127.0.0.1:{running.port}"




@contextmanager
def gateway(**settings: Any) -> Iterator[TestClient]:
    """A TestClient of the gateway; the intelligibility and speaker scorers are off unless given."""
    merged: dict[str, Any] = {"intelligibility": "", "speaker": "", **settings}
    config = GatewayConfig(**merged)
    with TestClient(create_app(config)) as client:
        yield client


def grpc_rules(endpoint: str) -> rule_rewards_pb2.ScoreRulesResponse:
    request = rule_rewards_pb2.ScoreRulesRequest(
        items=[rule_rewards_pb2.RuleRewardItem(**item) for item in ITEMS], weights=rule_rewards_pb2.RuleRewardWeights(keyword=0.5))
    with grpc.insecure_channel(endpoint) as channel:
        return rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(request, timeout=10)


def requests_total(text: str, route: str, status: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "speechrl_gateway_requests_total" and sample.labels.get("route") == route \
                    and sample.labels.get("status") == status:
                return float(sample.value)
    return 0.0


def test_rules_through_a_real_uvicorn_match_the_grpc_numbers(rules: str) -> None:
    expected = grpc_rules(rules)
    with uvicorn_in_thread(create_app(GatewayConfig(rules=rules, intelligibility="", speaker=""))) as url:
        reply = httpx.post(f"{url}/v1/rules/score", json={"items": ITEMS, "weights": {"keyword": 0.5}}, timeout=10)
        metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 200
    results = reply.json()["results"]
    for got, want in zip(results[:2], expected.results[:2], strict=True):
        assert got["error"] is None
        s, w = got["score"], want.score
        assert (s["wer"], s["accuracy_reward"], s["hallucination_reward"], s["keyword_reward"], s["total"]) == (
            w.wer, w.accuracy_reward, w.hallucination_reward, w.keyword_reward, w.total)
        assert s["hallucination_reasons"] == list(w.hallucination_reasons)
        assert s["word_counts"]["hits"] == w.word_counts.hits
    # The per-item error rides in the 200 reply, as in the gRPC reply.
    assert results[2] == {"score": None, "error": {"code": "EMPTY_TEXT", "message": expected.results[2].error.message,
                                                   "field": "items[2].reference"}}
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert requests_total(metrics.text, "/v1/rules/score", "200") >= 1


def test_metrics_count_requests_by_route_and_status(rules: str) -> None:
    with gateway(rules=rules) as client:
        before = client.get("/metrics").text
        client.post("/v1/rules/score", json={"items": ITEMS[:1]})
        client.post("/v1/rules/score", json={"items": []})
        client.get("/no/such/path")
        after = client.get("/metrics").text
    assert requests_total(after, "/v1/rules/score", "200") == requests_total(before, "/v1/rules/score", "200") + 1
    assert requests_total(after, "/v1/rules/score", "422") == requests_total(before, "/v1/rules/score", "422") + 1
    assert requests_total(after, "unmatched", "404") >= 1
    assert 'speechrl_gateway_request_seconds_bucket{le="0.005",method="POST",route="/v1/rules/score"}' in after


def test_readyz_is_200_when_the_scorers_serve_and_healthz_always(rules: str) -> None:
    with gateway(rules=rules) as client:
        ready = client.get("/readyz")
        assert client.get("/healthz").json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json()["scorers"] == {"rules": {"ready": True, "endpoints": {rules: "SERVING"}}}


def test_readyz_is_503_naming_the_scorer_that_is_down(rules: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with gateway(rules=rules, speaker=dead) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["detail"] == "not ready: speaker" and not body["ready"]
    assert body["scorers"]["speaker"] == {"ready": False, "endpoints": {dead: "UNAVAILABLE"}}
    assert body["scorers"]["rules"]["ready"]


@pytest.mark.parametrize(("payload", "where"), [
    ({"items": [{"reference": "a"}]}, ["body", "items", 0, "hypothesis"]),
    ({"items": [{"hypothesis": "a", "reference": 5}]}, ["body", "items", 0, "reference"]),
    ({"items": []}, ["body", "items"]),
    ({"items": [{"hypothesis": "a", "reference": "a"}], "weights": {"keyword": "NaN"}}, ["body", "weights", "keyword"]),
])
def test_malformed_json_is_422_naming_the_field(rules: str, payload: dict[str, Any], where: list[Any]) -> None:
    with gateway(rules=rules) as client:
        reply = client.post("/v1/rules/score", json=payload)
    assert reply.status_code == 422
    assert where in [error["loc"] for error in reply.json()["detail"]]


def test_a_body_that_is_not_json_is_422(rules: str) -> None:
    with gateway(rules=rules) as client:
        reply = client.post("/v1/rules/score", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 422 and reply.json()["detail"][0]["type"] == "json_invalid"


def test_audio_needs_exactly_one_source() -> None:
    with gateway(intelligibility=f"127.0.0.1:{free_port()}") as client:
        neither = client.post("/v1/intelligibility/score", json={"items": [{"reference_text": "a"}]})
        pcm_without_rate = client.post("/v1/intelligibility/score",
                                       json={"items": [{"pcm_base64": "AAAA", "reference_text": "a"}]})
    assert neither.status_code == 422 and "exactly one of audio_base64" in neither.text
    assert pcm_without_rate.status_code == 422 and "sample_rate_hertz is required" in pcm_without_rate.text


def test_bad_base64_is_400_naming_the_field() -> None:
    # The scorer is never reached: the gateway refuses the field itself, so a dead endpoint is enough.
    dead = f"127.0.0.1:{free_port()}"
    with gateway(intelligibility=dead, speaker=dead) as client:
        encoded = client.post("/v1/intelligibility/score", json={"items": [
            {"audio_base64": base64.b64encode(b"RIFF").decode(), "reference_text": "a"},
            {"audio_base64": "not base64!", "reference_text": "a"}]})
        pcm = client.post("/v1/speaker/embed", json={"audios": [{"pcm_base64": "AAA", "sample_rate_hertz": 16000}]})
        reference = client.post("/v1/speaker/score", json={"items": [
            {"audio_base64": "AAAA", "reference_audio": {"audio_base64": "%%%"}}]})
    assert (encoded.status_code, encoded.json()["field"]) == (400, "items[1].audio_base64")
    assert "not valid base64" in encoded.json()["detail"]
    assert (pcm.status_code, pcm.json()["field"]) == (400, "audios[0].pcm_base64")
    assert (reference.status_code, reference.json()["field"]) == (400, "items[0].reference_audio.audio_base64")


def test_invalid_argument_from_the_scorer_is_400_naming_the_field(strict_rules: str) -> None:
    with gateway(rules=strict_rules) as client:
        reply = client.post("/v1/rules/score", json={"items": [ITEMS[0]] * 3})
    assert reply.status_code == 400
    assert reply.json()["field"] == "items" and reply.json()["grpc_code"] == "INVALID_ARGUMENT"
    assert "over the server's limit of 2" in reply.json()["detail"]


def test_resource_exhausted_is_429_with_retry_after(strict_rules: str) -> None:
    with gateway(rules=strict_rules, max_attempts=1) as client:
        reply = client.post("/v1/rules/score", json={"items": [ITEMS[0]] * 2})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"
    assert reply.json()["grpc_code"] == "RESOURCE_EXHAUSTED"


def test_a_dead_scorer_is_503_and_a_silent_one_504() -> None:
    dead = f"127.0.0.1:{free_port()}"
    with socket.socket() as silent:  # accepts TCP connections and never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = GatewayConfig(rules=dead, speaker="", intelligibility=f"127.0.0.1:{silent.getsockname()[1]}",
                               request_timeout_s=0.5, max_attempts=2)
        with TestClient(create_app(config)) as client:
            down = client.post("/v1/rules/score", json={"items": ITEMS[:1]})
            slow = client.post("/v1/intelligibility/score", json={"items": [{"audio_base64": "AAAA", "reference_text": "a"}]})
    assert down.status_code == 503 and down.json()["grpc_code"] == "UNAVAILABLE"
    assert dead in down.json()["detail"] and "2 attempt(s)" in down.json()["detail"]
    assert slow.status_code == 504 and slow.json()["grpc_code"] == "DEADLINE_EXCEEDED"


def test_a_scorer_without_endpoints_is_503_saying_so() -> None:
    with gateway(rules="") as client:
        reply = client.post("/v1/rules/score", json={"items": ITEMS[:1]})
        ready = client.get("/readyz")
    assert reply.status_code == 503 and "SPEECHRL_GATEWAY_RULES" in reply.json()["detail"]
    assert ready.status_code == 200 and ready.json()["scorers"] == {}


def test_service_error_mapping() -> None:
    cases = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
             grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.INTERNAL: 502}
    for code, status in cases.items():
        assert service_error_response(ServiceError(code, "items[0].audio: bad")).status_code == status
    throttled = service_error_response(ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_after_s=2.2))
    assert throttled.headers["retry-after"] == "3"


def test_openapi_lists_the_routes_with_examples() -> None:
    with gateway(rules="") as client:
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert set(spec["paths"]) >= {
        "/v1/intelligibility/score", "/v1/intelligibility/score-upload", "/v1/speaker/score", "/v1/speaker/score-upload",
        "/v1/speaker/embed", "/v1/speaker/embed-upload", "/v1/speaker/register", "/v1/speaker/register-upload",
        "/v1/rules/score", "/healthz", "/readyz", "/metrics"}
    schemas = spec["components"]["schemas"]
    assert schemas["ScoreRulesBody"]["examples"][0]["items"][0]["reference"] == "the cat sat on the mat"
    assert "audio_base64" in schemas["IntelligibilityItemIn"]["properties"]
    assert set(spec["paths"]["/v1/rules/score"]["post"]["responses"]) >= {"200", "400", "422", "429", "503", "504"}


# ---- intelligibility and speaker routes, against the real scorers (Whisper tiny.en, Resemblyzer) ----

SENTENCE = "The quick brown fox jumps over the lazy dog."
OTHER = "Yesterday my neighbour painted the old wooden fence green."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def intelligibility() -> Iterator[str]:
    from speechrl.services.intelligibility.server import IntelligibilityConfig
    from speechrl.services.intelligibility.server import start as start_intelligibility

    with serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def speaker() -> Iterator[str]:
    from speechrl.services.speaker.server import SpeakerConfig
    from speechrl.services.speaker.server import start as start_speaker

    with serve_in_thread(lambda: start_speaker(SpeakerConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


async def test_intelligibility_routes_match_the_grpc_scorer(intelligibility: str, speech: Speech) -> None:
    wav = speech.wav(SENTENCE)
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    async with AsyncIntelligibilityClient(intelligibility) as direct:
        [expected] = await direct.score([wav], [SENTENCE], reward_mapping="one_minus_tanh_3wer")
    assert expected.score is not None and expected.score.wer < 0.6  # the model heard the sentence (espeak is hard for tiny.en)
    app = create_app(GatewayConfig(intelligibility=intelligibility, speaker="", rules=""))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=60) as http:
        reply = await http.post("/v1/intelligibility/score", json={"reward_mapping": "one_minus_tanh_3wer", "items": [
            {"audio_base64": b64(wav), "reference_text": SENTENCE},
            {"pcm_base64": b64(np.ascontiguousarray(samples, "<i2").tobytes()), "sample_rate_hertz": rate,
             "pcm_encoding": "s16le", "reference_text": SENTENCE},
            {"audio_base64": b64(b"not audio"), "reference_text": SENTENCE}]})
        upload = await http.post("/v1/intelligibility/score-upload", files={"file": ("a.wav", wav, "audio/wav")},
                                 data={"reference_text": SENTENCE, "reward_mapping": "one_minus_tanh_3wer"})
    await app.state.scorers.close()
    assert reply.status_code == 200 and upload.status_code == 200
    encoded, pcm, bad = reply.json()["results"]
    for got in (encoded["score"], pcm["score"], upload.json()["results"][0]["score"]):
        assert got["transcript"] == expected.score.transcript
        assert got["wer"] == pytest.approx(expected.score.wer) and got["reward"] == pytest.approx(expected.score.reward)
        assert got["reward_mapping"] == "one_minus_tanh_3wer"
    assert bad["score"] is None and bad["error"]["code"] == "INVALID_AUDIO" and bad["error"]["field"].startswith("items[2]")


async def test_speaker_routes_match_the_grpc_scorer(speaker: str, speech: Speech) -> None:
    reference, same, other = speech.wav(SENTENCE), speech.wav(OTHER), speech.wav(OTHER, voice="en-us+f3")
    app = create_app(GatewayConfig(speaker=speaker, intelligibility="", rules=""))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=60) as http:
        registered = await http.post("/v1/speaker/register-upload", data={"speaker_id": "alice"},
                                     files=[("files", ("r.wav", reference, "audio/wav"))])
        scored = await http.post("/v1/speaker/score", json={"items": [
            {"audio_base64": b64(same), "speaker_id": "alice"},
            {"audio_base64": b64(other), "reference_audio": {"audio_base64": b64(reference)}},
            {"audio_base64": b64(same), "reference_embedding": registered.json()["embedding"]},
            {"audio_base64": b64(same), "speaker_id": "nobody"},
            # The same reference as item 1 again: the client sends it once (reference_audios).
            {"audio_base64": b64(same), "reference_audio": {"audio_base64": b64(reference)}}]})
        uploaded = await http.post("/v1/speaker/score-upload", data={"speaker_id": "alice"},
                                   files={"file": ("s.wav", same, "audio/wav")})
        embedded = await http.post("/v1/speaker/embed", json={"audios": [{"audio_base64": b64(same)}]})
        both = await http.post("/v1/speaker/score-upload", data={"speaker_id": "alice"},
                               files={"file": ("s.wav", same, "audio/wav"), "reference_file": ("r.wav", reference, "audio/wav")})
    await app.state.scorers.close()
    async with AsyncSpeakerClient(speaker) as direct:
        expected = await direct.score([same, other], [SpeakerId("alice"), reference])
        [embedding] = await direct.embed([same])
    assert registered.status_code == 200 and registered.json()["speaker_id"] == "alice"
    assert scored.status_code == 200
    same_voice, other_voice, by_embedding, unknown, by_shared_audio = scored.json()["results"]
    assert same_voice["score"]["cosine"] == pytest.approx(expected[0].unwrap().cosine, abs=1e-6)
    assert other_voice["score"]["cosine"] == pytest.approx(expected[1].unwrap().cosine, abs=1e-6)
    assert by_embedding["score"]["cosine"] == pytest.approx(same_voice["score"]["cosine"], abs=1e-5)
    assert same_voice["score"]["cosine"] > other_voice["score"]["cosine"]
    assert unknown["error"]["code"] == "UNKNOWN_SPEAKER" and unknown["score"] is None
    assert by_shared_audio["score"]["cosine"] == pytest.approx(same_voice["score"]["cosine"], abs=1e-6)
    assert uploaded.json()["results"][0]["score"]["cosine"] == pytest.approx(same_voice["score"]["cosine"], abs=1e-6)
    np.testing.assert_allclose(embedded.json()["results"][0]["embedding"], embedding.unwrap(), atol=1e-6)
    assert (both.status_code, both.json()["field"]) == (400, "reference_file")


def test_a_malformed_request_timeout_is_400_naming_the_header(rules: str) -> None:
    with gateway(rules=rules) as client:
        for bad in ("soon", "0", "-1", "nan"):
            reply = client.post("/v1/rules/score", json={"items": ITEMS[:1]}, headers={"X-Request-Timeout": bad})
            assert reply.status_code == 400 and "X-Request-Timeout" in reply.json()["detail"], reply.text
        fine = client.post("/v1/rules/score", json={"items": ITEMS[:1]}, headers={"X-Request-Timeout": "20"})
        assert fine.status_code == 200


async def test_the_callers_deadline_reaches_the_scorer_which_drops_the_item(intelligibility: str, speech: Speech) -> None:
    def expired() -> float:
        return REGISTRY.get_sample_value("speechrl_items_expired_total", {"batcher": "intelligibility"}) or 0.0

    wav, before = speech.wav(SENTENCE), expired()
    app = create_app(GatewayConfig(intelligibility=intelligibility, speaker="", rules=""))  # request_timeout_s 30
    async with AsyncIntelligibilityClient(intelligibility, timeout_s=120) as direct, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=60) as http:
        busy = asyncio.ensure_future(direct.score([wav] * 12, [SENTENCE] * 12))  # seconds of Whisper
        await asyncio.sleep(0.5)
        started = time.monotonic()
        reply = await http.post("/v1/intelligibility/score", headers={"X-Request-Timeout": "0.5"},
                                json={"items": [{"audio_base64": b64(wav), "reference_text": SENTENCE}]})
        waited = time.monotonic() - started
        assert all(r.score is not None for r in await busy)
    await app.state.scorers.close()
    assert reply.status_code == 504 and reply.json()["grpc_code"] == "DEADLINE_EXCEEDED", reply.text
    assert waited < 3, f"the gateway waited {waited:.1f} s: its 30 s timeout applied, not the caller's 0.5 s"
    for _ in range(100):  # the scorer meets the abandoned item when it forms its next batch
        if expired() > before:
            break
        await asyncio.sleep(0.1)
    assert expired() > before, "the scorer ran an item whose caller had given up"
