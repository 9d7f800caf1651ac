"""The gateway's KServe v2 / Triton routes, driven with the payloads Triton clients send.

The token2wav_asr request is built exactly as CosyVoice's GRPO reward function builds it
(examples/grpo/cosyvoice2/reward_tts.py, CosyVoice @ ace7c47): TOKENS INT32 [1, N] as a nested
list, TOKEN_LENS INT32 [[N]], GT_TEXT BYTES [1, 1] with a flat ["text"], `?request_id=0`, and the
reward read as float(outputs[0].data[0]). The binary request is laid out as tritonclient.http
lays it out (Inference-Header-Content-Length, binary_data_size per input).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile
from prometheus_client import REGISTRY

from speechrl.client import IntelligibilityClient, RuleRewardsClient
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from tests.support.adapters import SENTENCES, cosyvoice_payload, speak, token2wav, tokens_for
from tests.support.servers import serve_in_thread, uvicorn_in_thread


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port(), max_wait_ms=20))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def intelligibility() -> Iterator[str]:
    with serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


def app_with(**settings: Any) -> Any:
    return create_app(GatewayConfig(**{"rules": "", "intelligibility": "", "speaker": "", **settings}))


def asgi(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=60)


def outputs(reply: httpx.Response) -> dict[str, Any]:
    return {o["name"]: o for o in reply.json()["outputs"]}


async def test_cosyvoice_token2wav_asr_client_works_unchanged(intelligibility: str) -> None:
    app = app_with(intelligibility=intelligibility)
    async with asgi(app) as http:
        missing = await http.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens_for(0), SENTENCES[0]),
                                  params={"request_id": "0"})
        not_ready = await http.get("/v2/models/token2wav_asr/ready")
        app.state.token2wav = token2wav  # a caller's own callable; the service-backed hook: test_gateway_token2wav.py
        ready = await http.get("/v2/models/token2wav_asr/ready")
        reply = await http.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens_for(0), SENTENCES[0]),
                                params={"request_id": "0"})
    await app.state.scorers.close()
    assert missing.status_code == 503 and missing.json()["error"].startswith("token2wav backend not configured")
    assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
    assert ready.status_code == 200 and ready.json() == {"name": "token2wav_asr", "ready": True, "reason": ready.json()["reason"]}
    with IntelligibilityClient(intelligibility) as client:
        [want] = client.score([speak(0)], [SENTENCES[0]], reward_mapping="one_minus_tanh_3wer")
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert float(result["outputs"][0]["data"][0]) == pytest.approx(want.unwrap().reward, abs=1e-6)  # what reward_tts.py reads
    out = outputs(reply)
    assert [o["name"] for o in result["outputs"]] == ["REWARDS", "TRANSCRIPTS", "WER", "ERROR_RATE", "SCORED", "ERRORS"]
    assert out["REWARDS"]["shape"] == [1, 1] and out["REWARDS"]["datatype"] == "FP32"
    assert out["TRANSCRIPTS"]["data"] == [want.unwrap().transcript] and out["SCORED"]["data"] == [True]


async def test_intelligibility_model_takes_base64_files_raw_samples_and_binary_tensors(intelligibility: str) -> None:
    wav = speak(1)
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    with IntelligibilityClient(intelligibility) as client:
        [want] = client.score([wav], [SENTENCES[1]], reward_mapping="one_minus_wer")
    app = app_with(intelligibility=intelligibility)
    by_file = {"parameters": {"reward_mapping": "one_minus_wer"}, "inputs": [
        {"name": "AUDIO", "shape": [2, 1], "datatype": "BYTES",
         "data": [base64.b64encode(wav).decode(), base64.b64encode(b"not audio").decode()]},
        {"name": "GT_TEXT", "shape": [2, 1], "datatype": "BYTES", "data": [SENTENCES[1], SENTENCES[1]]}],
        "outputs": [{"name": "REWARDS"}, {"name": "WER"}, {"name": "ERRORS"}]}
    by_samples = {"parameters": {"reward_mapping": "one_minus_wer"}, "inputs": [
        {"name": "WAV", "shape": [1, len(samples)], "datatype": "FP32", "data": samples.tolist()},
        {"name": "WAV_LENS", "shape": [1, 1], "datatype": "INT32", "data": [len(samples)]},
        {"name": "SAMPLE_RATE", "shape": [1, 1], "datatype": "INT32", "data": [rate]},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "data": [SENTENCES[1]]}]}
    # tritonclient.http's binary layout: JSON header, then each input's raw bytes (BYTES: 4-byte length + bytes).
    text = SENTENCES[1].encode()
    raw = [len(wav).to_bytes(4, "little") + wav, len(text).to_bytes(4, "little") + text]
    header = json.dumps({"parameters": {"reward_mapping": "one_minus_wer"}, "inputs": [
        {"name": "AUDIO", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw[0])}},
        {"name": "GT_TEXT", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw[1])}}],
        "outputs": [{"name": "REWARDS", "parameters": {"binary_data": True}}]}).encode()
    async with asgi(app) as http:
        files, waveform, binary = await asyncio.gather(
            http.post("/v2/models/intelligibility/infer", json=by_file),
            http.post("/v2/models/intelligibility/versions/1/infer", json=by_samples),
            http.post("/v2/models/intelligibility/infer", content=header + b"".join(raw),
                      headers={"Inference-Header-Content-Length": str(len(header)),
                               "Content-Type": "application/octet-stream"}))
    await app.state.scorers.close()
    assert files.status_code == 200, files.text
    assert [o["name"] for o in files.json()["outputs"]] == ["REWARDS", "WER", "ERRORS"]  # only the outputs asked for
    assert outputs(files)["REWARDS"]["data"] == pytest.approx([want.unwrap().reward, 0.0], abs=1e-6)
    assert outputs(files)["WER"]["data"][0] == pytest.approx(want.unwrap().wer, abs=1e-6)
    assert "INVALID_AUDIO" in outputs(files)["ERRORS"]["data"][1]  # a bad item costs only itself
    assert waveform.status_code == 200 and outputs(waveform)["REWARDS"]["data"] == pytest.approx([want.unwrap().reward], abs=1e-6)
    assert binary.status_code == 200, binary.text
    # REWARDS was asked for as binary: a JSON header naming its size, then 4 bytes of little-endian FP32.
    size = int(binary.headers["Inference-Header-Content-Length"])
    head = json.loads(binary.content[:size])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 4} and "data" not in head["outputs"][0]
    assert np.frombuffer(binary.content[size:], "<f4").tolist() == pytest.approx([want.unwrap().reward], abs=1e-6)


def test_tritonclient_gets_binary_and_json_outputs(rules: str) -> None:
    import tritonclient.http as triton

    hypotheses, references = ["turn on the light", "hello hello hello hello hello hello", "hi"], \
        ["turn on the lights", "hello world", ""]
    with RuleRewardsClient(rules) as client:
        want = client.score(hypotheses, references)
    inputs = [triton.InferInput("HYPOTHESIS", [3, 1], "BYTES"), triton.InferInput("REFERENCE", [3, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(hypotheses, dtype=object).reshape(3, 1))  # binary_data=True: its default
    inputs[1].set_data_from_numpy(np.array(references, dtype=object).reshape(3, 1), binary_data=False)
    asked = [triton.InferRequestedOutput("REWARDS", binary_data=True), triton.InferRequestedOutput("WER", binary_data=False),
             triton.InferRequestedOutput("SCORED", binary_data=True), triton.InferRequestedOutput("ERRORS", binary_data=True)]
    with uvicorn_in_thread(app_with(rules=rules)) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            result = client.infer("rules", inputs, outputs=asked)
        finally:
            client.close()
    rewards = [w.reward if w.reward is not None else 0.0 for w in want]
    np.testing.assert_allclose(result.as_numpy("REWARDS").reshape(-1), rewards, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("WER").reshape(-1)[:2], [w.score.wer for w in want[:2]], atol=1e-6)
    assert result.as_numpy("SCORED").reshape(-1).tolist() == [True, True, False]
    errors = [e.decode() for e in result.as_numpy("ERRORS").reshape(-1)]
    assert errors[:2] == ["", ""] and "reference" in errors[2]


def test_64_concurrent_single_item_rules_requests_are_answered_and_batched(rules: str) -> None:
    pairs = [("turn on the light", "turn on the lights"), ("hello hello hello hello hello hello", "hello world")]
    with RuleRewardsClient(rules) as client:
        want = [r.unwrap().total for r in client.score([h for h, _ in pairs], [r for _, r in pairs])]
    before = REGISTRY.get_sample_value("speechrl_batch_size_count", {"batcher": "rules"}) or 0.0
    items_before = REGISTRY.get_sample_value("speechrl_batch_size_sum", {"batcher": "rules"}) or 0.0

    def request(i: int) -> dict[str, Any]:
        h, r = pairs[i % 2]
        return {"id": str(i), "inputs": [{"name": "HYPOTHESIS", "shape": [1, 1], "datatype": "BYTES", "data": [h]},
                                         {"name": "REFERENCE", "shape": [1, 1], "datatype": "BYTES", "data": [r]}]}

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(http.post("/v2/models/rules/infer", json=request(i)) for i in range(64)))

    with uvicorn_in_thread(app_with(rules=rules)) as url:
        replies = asyncio.run(send_all(url))
    assert [r.status_code for r in replies] == [200] * 64
    for i, reply in enumerate(replies):
        assert reply.json()["id"] == str(i) and reply.json()["model_name"] == "rules"
        assert outputs(reply)["REWARDS"]["data"] == pytest.approx([want[i % 2]])
    after = REGISTRY.get_sample_value("speechrl_batch_size_count", {"batcher": "rules"}) or 0.0
    items_after = REGISTRY.get_sample_value("speechrl_batch_size_sum", {"batcher": "rules"}) or 0.0
    assert items_after - items_before == 64 and after - before < 64  # coalesced into batches by the scorer


async def test_metadata_health_and_errors_in_the_protocol_shape(rules: str) -> None:
    app = app_with(rules=rules)
    bad_rows = {"inputs": [{"name": "HYPOTHESIS", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "b"]},
                           {"name": "REFERENCE", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]}]}
    short = {"inputs": [{"name": "HYPOTHESIS", "shape": [2, 1], "datatype": "BYTES", "data": ["a"]}]}
    typo = {"inputs": [{"name": "HYPOTHESES", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    mixed = {"inputs": [{"name": "HYPOTHESIS", "shape": [2], "datatype": "BYTES", "data": ["a b", "c"]},
                        {"name": "REFERENCE", "shape": [2], "datatype": "BYTES", "data": ["a b", ""]}]}
    async with asgi(app) as http:
        server = await http.get("/v2")
        live, ready = await http.get("/v2/health/live"), await http.get("/v2/health/ready")
        meta = await http.get("/v2/models/token2wav_asr")
        unknown = await http.post("/v2/models/nope/infer", json=bad_rows)
        replies = [await http.post("/v2/models/rules/infer", json=p) for p in (bad_rows, short, typo)]
        not_json = await http.post("/v2/models/rules/infer", content=b"{", headers={"content-type": "application/json"})
        per_item = await http.post("/v2/models/rules/infer", json=mixed)
        off = await http.post("/v2/models/speaker/infer", json={"inputs": [
            {"name": "AUDIO", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}]})
    await app.state.scorers.close()
    assert server.json()["name"] == "speechrl-gateway" and live.json() == {"live": True}
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert meta.json()["inputs"] == [{"name": "TOKENS", "datatype": "INT32", "shape": [-1, -1]},
                                     {"name": "TOKEN_LENS", "datatype": "INT32", "shape": [-1, 1]},
                                     {"name": "GT_TEXT", "datatype": "BYTES", "shape": [-1, 1]},
                                     {"name": "LANGUAGE", "datatype": "BYTES", "shape": [-1, 1]}]
    assert meta.json()["outputs"][0] == {"name": "REWARDS", "datatype": "FP32", "shape": [-1, 1]}
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    assert [r.status_code for r in replies] == [400, 400, 400]
    assert "batch size" in replies[0].json()["error"]
    assert "input HYPOTHESIS: 1 values for shape [2, 1]" in replies[1].json()["error"]
    assert "unexpected input(s) ['HYPOTHESES']" in replies[2].json()["error"]
    assert not_json.status_code == 400 and "malformed inference request" in not_json.json()["error"]
    # one bad item is flagged and given the failure reward; its neighbour is scored
    out = outputs(per_item)
    assert out["SCORED"]["data"] == [True, False] and out["REWARDS"]["data"][1] == 0.0
    assert out["ERRORS"]["data"][0] == "" and "EMPTY_TEXT" in out["ERRORS"]["data"][1]
    assert off.status_code == 503 and "speaker scorer is not configured" in off.json()["error"]
