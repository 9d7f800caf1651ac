"""slime's remote reward model against the gateway and the real rule-reward service.

`remote_rm` below makes the call slime makes (THUDM/slime `slime/rollout/rm_hub/__init__.py:remote_rm`,
August 2026): POST `{"prompt", "response", "label"}` to `--rm-url`, raise on an HTTP error, and take
the reply's JSON as the reward (slime uses aiohttp; httpx sends the same JSON body).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from speechrl.client import RuleRewardsClient
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.servers import serve_in_thread, uvicorn_in_thread

PROMPT = "<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
SAMPLES = [("turn on the light", "turn on the lights"), ("the cat sat on the mat", "the cat sat on the mat"),
           ("hello hello hello hello hello hello", "hello world"), ("good morning", '{"reference": "good morning '
                                                                                    'everyone", "keywords": ["everyone"]}')]


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_wait_ms=20))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def gateway(rules: str) -> Iterator[str]:
    with uvicorn_in_thread(create_app(GatewayConfig(intelligibility="", speaker="", rules=rules))) as url:
        yield url


async def remote_rm(rm_url: str, prompt: Any, response: str, label: Any) -> Any:
    payload = {"prompt": prompt, "response": response, "label": label}
    async with httpx.AsyncClient(timeout=120) as session:
        resp = await session.post(rm_url, json=payload)
        resp.raise_for_status()
        return resp.json()


def test_slime_gets_the_rule_services_reward_per_sample(gateway: str, rules: str) -> None:
    async def rollout() -> list[Any]:  # slime's batched_async_rm: one remote_rm per sample, gathered
        return await asyncio.gather(*(remote_rm(f"{gateway}/v1/slime/rules?keyword_weight=0.5", PROMPT, response,
                                                label) for response, label in SAMPLES))

    rewards = asyncio.run(rollout())
    with RuleRewardsClient(rules) as client:
        want = client.score([r for r, _ in SAMPLES], ["turn on the lights", "the cat sat on the mat", "hello world",
                                                      "good morning everyone"],
                            keywords=[[], [], [], ["everyone"]], keyword_weight=0.5)
    assert all(isinstance(r, float) for r in rewards)  # a bare number, as slime adds it to the sample
    assert rewards == pytest.approx([w.reward for w in want], abs=1e-6)
    assert rewards[2] < 0  # the looping hypothesis is a hallucination (R2 = -1)


def test_detail_answers_a_dict_for_reward_key(gateway: str) -> None:
    reply = asyncio.run(remote_rm(f"{gateway}/v1/slime/rules?detail=true", [{"role": "user", "content": "hi"}],
                                  "turn on the light<|im_end|>", "turn on the lights"))
    assert set(reply) == {"reward", "scored", "wer", "accuracy", "hallucination", "keyword"}
    assert reply["scored"] == 1.0 and reply["wer"] == pytest.approx(0.25)


def test_a_sample_without_a_label_is_refused_naming_the_field(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        missing = http.post("/v1/slime/rules", json={"prompt": PROMPT, "response": "hello"})
        unscorable = http.post("/v1/slime/rules?detail=true", json={"prompt": PROMPT, "response": "hi", "label": ""})
    assert missing.status_code == 422 and "label" in missing.text
    assert unscorable.status_code == 200 and unscorable.json()["scored"] == 0.0  # an empty reference: its own error
