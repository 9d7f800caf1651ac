"""OpenRLHF's reward_func file mode with speechrl/adapters/openrlhf_reward_func.py, against the real scorers.

`load_reward_func` and `fetch_rewards_via_func` make the calls OpenRLHF makes (OpenRLHF/OpenRLHF
`openrlhf/utils/agent.py:SingleTurnAgentExecutor`, August 2026): the file is loaded with
importlib's spec_from_file_location under the name "reward_func", and `reward_func(queries,
prompts, labels)` runs in a worker thread, one sample per call, each query the whole decoded
sequence with special tokens kept.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import speechrl.adapters.openrlhf
import speechrl.adapters.openrlhf_reward_func
from speechrl.client import IntelligibilityClient, RuleRewardsClient, Token2WavClient
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.services.token2wav.server import Token2WavConfig
from speechrl.services.token2wav.server import start as start_token2wav
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from tests.support.servers import serve_in_thread

PROMPT = "<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
SAMPLES = [("turn on the light", "turn on the lights"), ("hello hello hello hello hello hello", "hello world"),
           ("good morning", '{"reference": "good morning everyone", "keywords": ["everyone"]}'), ("anything", "")]


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, str]]:
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port()))) as rules, \
            serve_in_thread(lambda: start_token2wav(Token2WavConfig(port=free_port()))) as t2w, \
            serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as asr:
        yield {"rules": f"127.0.0.1:{rules.port}", "token2wav": f"127.0.0.1:{t2w.port}",
               "intelligibility": f"127.0.0.1:{asr.port}"}


def load_reward_func(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location("reward_func", path)
    assert spec is not None and spec.loader is not None
    reward_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_module)
    return reward_module.reward_func  # type: ignore[no-any-return]


async def fetch_rewards_via_func(reward_func: Callable[..., Any], queries: list[str], prompts: list[str],
                                 labels: list[Any]) -> list[Any]:
    return await asyncio.gather(*(asyncio.to_thread(reward_func, queries[i:i + 1], prompts[i:i + 1], labels[i:i + 1])
                                  for i in range(len(queries))))


def test_the_file_scores_asr_samples_as_the_rule_service_does(services: dict[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEECHRL_OPENRLHF_RULES", services["rules"])
    monkeypatch.setenv("SPEECHRL_OPENRLHF_KEYWORD_WEIGHT", "0.5")
    reward_func = load_reward_func(speechrl.adapters.openrlhf_reward_func.__file__)
    queries = [PROMPT + response + "<|im_end|><|endoftext|>" for response, _ in SAMPLES]
    infos = asyncio.run(fetch_rewards_via_func(reward_func, queries, [PROMPT] * len(SAMPLES),
                                               [label for _, label in SAMPLES]))
    with RuleRewardsClient(services["rules"]) as client:
        want = client.score([r for r, _ in SAMPLES[:3]], ["turn on the lights", "hello world", "good morning everyone"],
                            keywords=[[], [], ["everyone"]], keyword_weight=0.5)
    rewards = [info["rewards"][0] for info in infos]
    assert rewards[:3] == pytest.approx([w.reward for w in want], abs=1e-6)
    assert rewards[3] == 0.0 and infos[3]["extra_logs"]["scored"] == [0.0]  # an empty reference: not scored
    assert infos[0]["scores"] == infos[0]["rewards"]
    assert set(infos[0]["extra_logs"]) == {"scored", "wer", "accuracy", "hallucination", "keyword"}


def test_the_file_scores_speech_tokens_through_token2wav_and_the_asr(services: dict[str, str],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("token2wav", "intelligibility"):
        monkeypatch.setenv(f"SPEECHRL_OPENRLHF_{name.upper()}", services[name])
    monkeypatch.setenv("SPEECHRL_OPENRLHF_SCORER", "token2wav_asr")
    sentence = "please turn on the kitchen lights"
    tokens = PhonemeVocabulary().text_to_ids(sentence)
    query = PROMPT + "".join(f"<|s_{t}|>" for t in tokens) + "<|im_end|>"
    reward_func = load_reward_func(speechrl.adapters.openrlhf_reward_func.__file__)
    (info,) = asyncio.run(fetch_rewards_via_func(reward_func, [query], [PROMPT], [sentence]))
    with Token2WavClient(services["token2wav"]) as vocoder, IntelligibilityClient(services["intelligibility"]) as asr:
        (speech,) = vocoder.synthesize([tokens])
        (want,) = asr.score([speech.wav], [sentence], reward_mapping="one_minus_tanh_3wer")
    assert info["rewards"] == [pytest.approx(want.reward, abs=1e-6)] and want.reward > 0.5
    assert info["extra_logs"]["wer"] == [pytest.approx(want.score.wer)]


def test_bad_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEECHRL_OPENRLHF_KEYWORD_WEIGHT", "lots")
    with pytest.raises(ValueError, match="SPEECHRL_OPENRLHF_KEYWORD_WEIGHT must be a number"):
        speechrl.adapters.openrlhf.OpenRLHFRewardSettings.from_env()
    monkeypatch.setenv("SPEECHRL_OPENRLHF_KEYWORD_WEIGHT", "1")
    monkeypatch.setenv("SPEECHRL_OPENRLHF_SCORER", "speaker")
    with pytest.raises(ValueError, match="SPEECHRL_OPENRLHF_SCORER must be rules or token2wav_asr"):
        speechrl.adapters.openrlhf.OpenRLHFRewardSettings.from_env()
