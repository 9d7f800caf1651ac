"""The gateway's token2wav hook backed by the real token2wav service (espeak-phonemes backend) and the
real intelligibility scorer (Whisper tiny.en): speech tokens of a sentence, as a TTS policy would
emit them, become audio, a transcript and a reward, through a real uvicorn gateway.

Tokens are tokens.py's phoneme ids with no offset: the gateway passes <|s_N|> / TOKENS ids to the
service as they are (0-based within the service's vocabulary, as CosyVoice numbers its tokens).
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from speechrl.client import Token2WavClient
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.gateway.prompts import PromptPool
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from tests.support.adapters import cosyvoice_payload
from tests.support.servers import serve_in_thread, uvicorn_in_thread

SENTENCE = "Please turn on the kitchen lights."
WRONG = "Yesterday my neighbour painted the old wooden fence green."
# SENTENCE with its last word in Chinese: its pinyin is "please turn on the kitchen deng1", six words,
# so a transcript of SENTENCE differs from it in one word of six under the pinyin unit.
HALF_CHINESE = "please turn on the kitchen 灯"


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, str]]:
    with serve_in_thread(lambda: start_token2wav(Token2WavConfig(port=free_port()))) as t2w, \
            serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as asr:
        yield {"token2wav": f"127.0.0.1:{t2w.port}", "intelligibility": f"127.0.0.1:{asr.port}"}


@pytest.fixture(scope="module")
def gateway(backends: dict[str, str]) -> Iterator[str]:
    config = GatewayConfig(rules="", speaker="", **backends)
    with uvicorn_in_thread(create_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    return PhonemeVocabulary().text_to_ids(SENTENCE)


@pytest.fixture(scope="module")
def prompt_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two prompt speakers, spoken by espeak-ng (22.05 kHz), as the recipe's pool of prompt utterances."""
    folder = tmp_path_factory.mktemp("prompts")
    for name, voice in (("alice.wav", "en-us"), ("bob.wav", "en-gb")):
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(folder / name), "This is my voice."], check=True)
    return folder


def openrlhf_body(token_lists: list[list[int]], labels: list[str]) -> dict[str, Any]:
    queries = ["<|im_start|>assistant\n" + "".join(f"<|s_{t}|>" for t in ids) + "<|im_end|>" for ids in token_lists]
    return {"query": queries, "labels": labels}


def test_the_client_renders_tokens_with_per_item_errors(backends: dict[str, str], tokens: list[int]) -> None:
    with Token2WavClient(backends["token2wav"], timeout_s=60) as client:
        good, bad = client.synthesize([tokens, [len(PhonemeVocabulary()) + 5]])
    assert good.ok and good.wav is not None and good.wav[:4] == b"RIFF" and good.duration_seconds > 0.5
    assert bad.error is not None and bad.error.field == "items[1].tokens" and "outside" in bad.error.message


def test_triton_token2wav_asr_rewards_the_right_text_higher(gateway: str, tokens: list[int]) -> None:
    with httpx.Client(base_url=gateway, timeout=120) as http:
        ready = http.get("/v2/models/token2wav_asr/ready")
        right = http.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens, SENTENCE))
        wrong = http.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens, WRONG))
        readyz = http.get("/readyz")
    assert ready.status_code == 200 and "token2wav" in ready.json()["reason"]
    assert readyz.status_code == 200 and readyz.json()["scorers"]["token2wav"]["ready"]
    assert right.status_code == 200 and wrong.status_code == 200, (right.text, wrong.text)
    rewards = [float(r.json()["outputs"][0]["data"][0]) for r in (right, wrong)]
    transcript = {o["name"]: o for o in right.json()["outputs"]}["TRANSCRIPTS"]["data"][0]
    assert "kitchen" in transcript.lower(), transcript
    assert rewards[0] > 0.5 and rewards[0] > rewards[1] + 0.3, rewards


def test_token2wav_asr_scores_the_recipes_pinyin_error_rate(gateway: str, tokens: list[int]) -> None:
    payload = cosyvoice_payload(tokens, HALF_CHINESE) | {"parameters": {"error_unit": "pinyin"}}
    with httpx.Client(base_url=gateway, timeout=120) as http:
        reply = http.post("/v2/models/token2wav_asr/infer", json=payload)
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o["data"][0] for o in reply.json()["outputs"]}
    assert outputs["TRANSCRIPTS"].strip() == SENTENCE, outputs  # the case below is worked out for this transcript
    # hypothesis "please turn on the kitchen lights" (TN drops the full stop) against
    # "please turn on the kitchen deng1": one substitution in six words.
    assert outputs["ERROR_RATE"] == pytest.approx(1 / 6, abs=1e-6)
    assert outputs["REWARDS"] == pytest.approx(max(0.0, 1 - math.tanh(3 / 6)), abs=1e-6)  # the recipe's reward


def test_the_recipes_own_request_gets_the_recipes_reward_from_a_gateway_set_up_as_its_server(
        backends: dict[str, str], tokens: list[int], prompt_folder: Path) -> None:
    # reward_tts.py sends no parameters, so the recipe's settings are the gateway's: pinyin and a prompt pool.
    config = GatewayConfig(rules="", speaker="", token2wav_prompts=str(prompt_folder), token2wav_asr_error_unit="pinyin",
                           **backends)
    with uvicorn_in_thread(create_app(config)) as url, httpx.Client(base_url=url, timeout=120) as http:
        reply = http.post("/v2/models/token2wav_asr/infer", json=cosyvoice_payload(tokens, HALF_CHINESE),
                          params={"request_id": "0"})  # as reward_tts.py posts it
    assert reply.status_code == 200, reply.text
    outputs = {o["name"]: o["data"][0] for o in reply.json()["outputs"]}
    assert outputs["TRANSCRIPTS"].strip() == SENTENCE, outputs
    assert reply.json()["outputs"][0]["data"][0] == pytest.approx(1 - math.tanh(3 / 6), abs=1e-6)


def test_token2wav_asr_draws_a_prompt_speaker_per_item(backends: dict[str, str], tokens: list[int],
                                                        prompt_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = GatewayConfig(rules="", speaker="", token2wav_prompts=str(prompt_folder), token2wav_prompt_seed=7,
                           **backends)
    payload = cosyvoice_payload(tokens, SENTENCE)
    payload["inputs"][0]["data"] *= 3  # three items: the same tokens three times
    payload["inputs"][0]["shape"][0] = payload["inputs"][1]["shape"][0] = payload["inputs"][2]["shape"][0] = 3
    payload["inputs"][1]["data"] *= 3
    payload["inputs"][2]["data"] *= 3
    with caplog.at_level(logging.DEBUG, logger="speechrl.services.gateway.prompts"), \
            uvicorn_in_thread(create_app(config)) as url, httpx.Client(base_url=url, timeout=120) as http:
        reply = http.post("/v2/models/token2wav_asr/infer", json=payload)
    assert reply.status_code == 200, reply.text
    assert min(reply.json()["outputs"][0]["data"]) > 0.5  # rendered (the prompts sent along) and scored
    expected = [p.name for p in PromptPool.from_folder(prompt_folder, seed=7).draw(3)]  # the same seeded draws
    assert f"token2wav prompt speakers: {expected}" in caplog.text
    assert {p.name for p in PromptPool.from_folder(prompt_folder).draw(40)} == {"alice.wav", "bob.wav"}


def test_a_bad_prompt_folder_is_refused_at_start_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="holds no"):
        create_app(GatewayConfig(token2wav="127.0.0.1:1", token2wav_prompts=str(tmp_path)))
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="broken.wav"):
        create_app(GatewayConfig(token2wav="127.0.0.1:1", token2wav_prompts=str(tmp_path)))
    (tmp_path / "broken.wav").unlink()
    subprocess.run(["sox", "-n", "-r", "8000", str(tmp_path / "phone.wav"), "synth", "0.5", "sine", "300"], check=True)
    with pytest.raises(ValueError, match="phone.wav has 4000 samples at 8000 Hz"):
        create_app(GatewayConfig(token2wav="127.0.0.1:1", token2wav_prompts=str(tmp_path)))


def test_openrlhf_token2wav_asr_rewards_the_right_text_higher(gateway: str, tokens: list[int]) -> None:
    out_of_range = [len(PhonemeVocabulary()) + 5]
    body = openrlhf_body([tokens, tokens, out_of_range], [SENTENCE, WRONG, SENTENCE])
    with httpx.Client(base_url=gateway, timeout=120) as http:
        reply = http.post("/v1/openrlhf/token2wav_asr", json=body)
    assert reply.status_code == 200, reply.text
    result = reply.json()
    rewards, scored = result["rewards"], result["extra_logs"]["scored"]
    assert scored == [1.0, 1.0, 0.0]  # the bad item costs only itself
    assert rewards[0] > 0.5 and rewards[0] > rewards[1] + 0.3 and rewards[2] == 0.0, rewards


async def test_a_dead_token2wav_follows_the_failure_policy() -> None:
    dead = f"127.0.0.1:{free_port()}"
    body = openrlhf_body([[5, 6, 7]], [SENTENCE])
    codes = {}
    for policy in ("reward", "http"):
        app = create_app(GatewayConfig(rules="", speaker="", intelligibility=dead, token2wav=dead, max_attempts=1,
                                       request_timeout_s=2, adapter_scorer_errors=policy))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            reply = await http.post("/v1/openrlhf/token2wav_asr", json=body)
            not_ready = await http.get("/v2/models/token2wav_asr/ready")
        await app.state.scorers.close()
        codes[policy] = reply.status_code
        assert not_ready.status_code == 503
        if policy == "reward":
            assert reply.json()["extra_logs"]["scored"] == [0.0] and reply.json()["rewards"] == [0.0]
    assert codes == {"reward": 200, "http": 503}
