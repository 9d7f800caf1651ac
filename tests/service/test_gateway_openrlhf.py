"""The gateway's OpenRLHF remote reward endpoint, driven with the payloads OpenRLHF sends.

OpenRLHF's single-turn agent (openrlhf/utils/agent.py, OpenRLHF @ 3c3be62) POSTs, for every sample
on its own and all samples at once, `{"query": [prompt + response decoded with special tokens],
"prompts": [prompt], "labels": [label]}` and reads `rewards`, `scores` and `extra_logs` back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from speechrl.client import RuleRewardsClient
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.adapters import token2wav, tokens_for
from tests.support.servers import serve_in_thread, uvicorn_in_thread

PROMPT = "<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
HYPOTHESES = ["turn on the light", "the cat sat on the mat", "hello hello hello hello hello hello", "good morning"]
REFERENCES = ["turn on the lights", "the cat sat on the mat", "hello world", "good morning everyone"]


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    # A few ms of batching wait, as on a GPU box, so concurrent single-sample requests share batches.
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_wait_ms=20))) as running:
        yield f"127.0.0.1:{running.port}"


def payload(hypothesis: str, label: Any) -> dict[str, Any]:
    """What OpenRLHF sends for one sample: the query is the whole decoded sequence, special tokens kept."""
    return {"query": [PROMPT + hypothesis + "<|im_end|>"], "prompts": [PROMPT], "labels": [label]}


def gateway_app(**settings: Any) -> Any:
    return create_app(GatewayConfig(**{"intelligibility": "", "speaker": "", **settings}))


def asgi(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30)


def batches(batcher: str = "rules") -> tuple[float, float]:
    """(batches run, items in them) of a batcher so far, from the scorers' batch-size histogram."""
    count = REGISTRY.get_sample_value("speechrl_batch_size_count", {"batcher": batcher}) or 0.0
    total = REGISTRY.get_sample_value("speechrl_batch_size_sum", {"batcher": batcher}) or 0.0
    return count, total


def test_64_concurrent_single_sample_requests_are_answered_and_batched(rules: str) -> None:
    samples = [(HYPOTHESES[i % 4], REFERENCES[i % 4]) for i in range(64)]
    with RuleRewardsClient(rules) as client:
        expected = {h: r.unwrap().total for h, r in zip(HYPOTHESES, client.score(HYPOTHESES, REFERENCES), strict=True)}
        processed_before = client.get_service_status().items_processed
    count_before, items_before = batches()
    app = gateway_app(rules=rules)

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(http.post("/v1/openrlhf/rules", json=payload(h, r)) for h, r in samples))

    with uvicorn_in_thread(app) as url:
        replies = asyncio.run(send_all(url))
        channels = len(app.state.scorers.rules.connection._channels)
    assert [r.status_code for r in replies] == [200] * 64
    for (hypothesis, _), reply in zip(samples, replies, strict=True):
        body = reply.json()
        assert body["rewards"] == pytest.approx([expected[hypothesis]]) and body["scores"] == body["rewards"]
        assert body["extra_logs"]["scored"] == [1.0] and set(body["extra_logs"]) == {
            "scored", "wer", "accuracy", "hallucination", "keyword"}
    count_after, items_after = batches()
    with RuleRewardsClient(rules) as client:
        assert client.get_service_status().items_processed - processed_before == 64
    assert items_after - items_before == 64
    assert count_after - count_before < 64  # the scorer coalesced single-sample requests into batches
    assert channels == 1  # one shared channel to the scorer, not one per request


async def test_batched_queries_labels_as_dicts_and_unscorable_samples(rules: str) -> None:
    app = gateway_app(rules=rules)
    body = {"query": [PROMPT + "turn on the light<|im_end|><|endoftext|>", PROMPT + "turn on the light", "no prompt here",
                      PROMPT + "anything"],
            "prompts": [PROMPT] * 4,
            "labels": [{"reference": "turn on the kitchen light", "keywords": ["kitchen"]},
                       json.dumps({"reference": "turn on the light"}), "no prompt here", None]}
    async with asgi(app) as http:
        reply = await http.post("/v1/openrlhf/reward?keyword_weight=0.5", json=body)
        mismatched = await http.post("/v1/openrlhf/rules", json={"query": ["a", "b"], "labels": ["a"]})
        unknown = await http.post("/v1/openrlhf/nope", json={"query": ["a"], "labels": ["a"]})
        unlabelled = await http.post("/v1/openrlhf/rules", json={"query": [PROMPT + "turn on the light"]})
    await app.state.scorers.close()
    with RuleRewardsClient(rules) as client:
        want = client.score(["turn on the light"] * 2, ["turn on the kitchen light", "turn on the light"], keywords=[["kitchen"], []],
                            keyword_weight=0.5)
    assert reply.status_code == 200, reply.text
    got = reply.json()
    assert got["rewards"] == pytest.approx([want[0].unwrap().total, want[1].unwrap().total, 1.5, 0.0])
    assert got["extra_logs"]["scored"] == [1.0, 1.0, 1.0, 0.0]  # no label: the failure reward, flagged
    assert got["extra_logs"]["keyword"][:2] == [0.5, 1.0]  # the dict label's keywords reached the scorer
    assert mismatched.status_code == 422 and "labels has 1 entries for 2 queries" in mismatched.text
    assert unknown.status_code == 422
    # No labels at all is the caller's bug, not a batch of failed samples: refused, the field named.
    assert unlabelled.status_code == 422 and "labels" in unlabelled.text, unlabelled.text


async def test_in_flight_bound_answers_429_with_retry_after() -> None:
    # A rules server that holds every batch 300 ms: requests pile up in the gateway.
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_wait_ms=300, max_batch_size=1))) as slow:
        app = gateway_app(rules=f"127.0.0.1:{slow.port}", max_inflight_requests=3)
        async with asgi(app) as http:
            replies = await asyncio.gather(*(http.post("/v1/openrlhf/rules", json=payload("a b", "a b")) for _ in range(8)))
            after = await http.post("/v1/openrlhf/rules", json=payload("a b", "a b"))
        await app.state.scorers.close()
    statuses = sorted(r.status_code for r in replies)
    assert statuses.count(200) == 3 and statuses.count(429) == 5
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "max_inflight_requests" in refused.json()["detail"]
    assert after.status_code == 200 and app.state.inflight.busy == 0


async def test_a_dead_scorer_gives_the_failure_reward_or_an_http_error() -> None:
    dead = f"127.0.0.1:{free_port()}"
    as_reward = gateway_app(rules=dead, request_timeout_s=1, max_attempts=2, adapter_failure_reward=-1.0)
    as_http = gateway_app(rules=dead, request_timeout_s=1, max_attempts=1, adapter_scorer_errors="http")
    async with asgi(as_reward) as http:
        soft = await http.post("/v1/openrlhf/rules", json=payload("a", "a"))
    async with asgi(as_http) as http:
        hard = await http.post("/v1/openrlhf/rules", json=payload("a", "a"))
    assert soft.status_code == 200 and soft.json()["rewards"] == [-1.0] and soft.json()["extra_logs"]["scored"] == [0.0]
    assert hard.status_code == 503 and hard.json()["grpc_code"] == "UNAVAILABLE"


async def test_speech_tokens_need_a_token2wav_backend() -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = gateway_app(rules="", intelligibility=dead, request_timeout_s=1, max_attempts=1)
    tokens = "".join(f"<|s_{t}|>" for t in tokens_for(0))
    async with asgi(app) as http:
        missing = await http.post("/v1/openrlhf/token2wav_asr", json=payload(tokens, "the quick brown fox"))
        app.state.token2wav = token2wav  # a caller's own callable; the service-backed hook: test_gateway_token2wav.py
        attached = await http.post("/v1/openrlhf/token2wav_asr", json=payload(tokens, "the quick brown fox"))
    await app.state.scorers.close()
    assert missing.status_code == 503 and "token2wav backend not configured" in missing.json()["detail"]
    # with a token2wav the audio reaches the intelligibility scorer, which is down here: flagged, not fatal
    assert attached.status_code == 200 and attached.json()["extra_logs"]["scored"] == [0.0]
    assert set(attached.json()["extra_logs"]) == {"scored", "wer", "cer", "error_rate"}
