"""verl's reward functions, called exactly as verl's reward managers call them, against the real scorers.

verl is not installed: its calling code is reproduced here from verl (volcengine/verl @ b178a3c):
- custom functions are wrapped by verl/trainer/ppo/reward.py:get_custom_reward_fn as
  partial(_call_with_kwargs[_async], raw_fn, reward_kwargs), the YAML reward_kwargs winning;
- the naive manager (verl/workers/reward_manager/naive.py) calls compute_score(data_source=,
  solution_str=, ground_truth=, extra_info=) per response, extra_info gaining num_turns and
  rollout_reward_scores, and writes score["score"] (or the float) into a float tensor;
- the batch manager (batch.py) calls compute_score(data_sources=, solution_strs=, ground_truths=,
  extra_infos=, **reward_kwargs) with numpy object arrays;
- the reward loop (verl/experimental/reward_loop/reward_manager/naive.py) awaits coroutine
  functions, and reward_loop.py stacks every key of the first result's dict over all results.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest

from speechrl.adapters import Token2WavNotConfigured
from speechrl.adapters import verl as speechrl_verl
from speechrl.client import IntelligibilityClient, RuleRewardsClient
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from tests.support.adapters import SENTENCES, speak, tokens_for
from tests.support.servers import serve_in_thread

ASR = [("turn on the light", "turn on the lights", {"keywords": ["light"]}),
       ("hello hello hello hello hello hello", "hello world", {}),
       ("anything at all", "", {})]  # an empty reference: the service's per-item error


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def intelligibility() -> Iterator[str]:
    with serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


# ---- verl's calling code, reproduced ----

def _call_with_kwargs(raw_fn: Callable[..., Any], extra_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return raw_fn(*args, **{**kwargs, **extra_kwargs})


async def _call_with_kwargs_async(raw_fn: Callable[..., Any], extra_kwargs: dict[str, Any], *args: Any,
                                  **kwargs: Any) -> Any:
    return await raw_fn(*args, **{**kwargs, **extra_kwargs})


def custom_reward_fn(name: str, reward_kwargs: dict[str, Any]) -> Callable[..., Any]:
    """get_custom_reward_fn with path=pkg://speechrl.adapters.verl."""
    raw_fn = getattr(speechrl_verl, name)
    wrapper = _call_with_kwargs_async if inspect.iscoroutinefunction(raw_fn) else _call_with_kwargs
    return partial(wrapper, raw_fn, reward_kwargs)


def naive_manager(compute_score: Callable[..., Any], samples: list[tuple[str, Any, dict[str, Any]]]
                  ) -> tuple[np.ndarray, dict[str, list[Any]]]:
    reward_tensor = np.zeros((len(samples), 4), dtype=np.float32)
    reward_extra_info: dict[str, list[Any]] = defaultdict(list)
    for i, (response, ground_truth, extra) in enumerate(samples):
        extra_info = {**extra, "num_turns": None, "rollout_reward_scores": {}}
        score = compute_score(data_source="speech", solution_str=response, ground_truth=ground_truth,
                              extra_info=extra_info)
        if isinstance(score, dict):
            reward = score["score"]
            for key, value in score.items():
                reward_extra_info[key].append(value)
        else:
            reward = score
        reward_tensor[i, 3] = reward
    return reward_tensor, reward_extra_info


def batch_manager(compute_score: Callable[..., Any], samples: list[tuple[str, Any, dict[str, Any]]]) -> list[Any]:
    extras = np.empty(len(samples), dtype=object)
    extras[:] = [{**e, "rollout_reward_scores": {}} for _, _, e in samples]
    return list(compute_score(data_sources=np.array(["speech"] * len(samples), dtype=object),
                              solution_strs=[r for r, _, _ in samples], ground_truths=[g for _, g, _ in samples],
                              extra_infos=extras))


async def reward_loop(compute_score: Callable[..., Any], samples: list[tuple[str, Any, dict[str, Any]]]
                      ) -> tuple[list[float], dict[str, np.ndarray]]:
    assert inspect.iscoroutinefunction(compute_score)  # how the reward loop decides to await it

    async def run_single(response: str, ground_truth: Any, extra: dict[str, Any]) -> dict[str, Any]:
        extra_info = {**extra, "num_turns": None, "rollout_reward_scores": {}}
        result = await compute_score(data_source="speech", solution_str=response, ground_truth=ground_truth,
                                     extra_info=extra_info)
        if isinstance(result, dict):
            return {"reward_score": result["score"], "reward_extra_info": dict(result)}
        return {"reward_score": result, "reward_extra_info": {"acc": result}}

    outputs = await asyncio.gather(*(run_single(*s) for s in samples))
    infos = [o["reward_extra_info"] for o in outputs]
    return [o["reward_score"] for o in outputs], {key: np.array([info[key] for info in infos]) for key in infos[0]}


def expected_rules(endpoint: str) -> list[float | None]:
    with RuleRewardsClient(endpoint) as client:
        return [r.reward for r in client.score([h for h, _, _ in ASR], [g for _, g, _ in ASR],
                                               keywords=[e.get("keywords", []) for _, _, e in ASR])]


def test_asr_scores_match_the_rules_service_in_all_three_managers(rules: str) -> None:
    expected = expected_rules(rules)
    assert expected[2] is None and expected[0] is not None and expected[1] is not None
    kwargs = {"rules_endpoints": rules, "task": "asr"}

    tensor, extra = naive_manager(custom_reward_fn("compute_score", kwargs), ASR)
    assert tensor[:, 3].tolist() == pytest.approx([expected[0], expected[1], 0.0])
    assert extra["scored"] == [True, True, False] and extra["error"][:2] == ["", ""]
    assert "EMPTY_TEXT" in extra["error"][2]
    assert set(extra) == {"score", "scored", "error", "wer", "accuracy", "hallucination", "keyword"}
    assert extra["hallucination"][1] == -1.0 and extra["keyword"][0] > 0

    batch = batch_manager(custom_reward_fn("compute_score_batch", kwargs), ASR)
    assert [b["score"] for b in batch] == pytest.approx([expected[0], expected[1], 0.0])

    scores, stacked = asyncio.run(reward_loop(custom_reward_fn("compute_score_async", kwargs), ASR))
    assert scores == pytest.approx([expected[0], expected[1], 0.0])
    assert stacked["scored"].tolist() == [True, True, False] and stacked["wer"].dtype == np.float64


def test_floats_labels_as_dicts_and_yaml_strings(rules: str) -> None:
    # return_dict=false and a dict ground truth; values arrive as strings from a YAML config
    fn = custom_reward_fn("compute_score", {"rules_endpoints": rules, "return_dict": "false",
                                            "keyword_weight": "0.5", "failure_score": "-1"})
    with RuleRewardsClient(rules) as client:
        [want] = client.score(["turn on the light"], ["turn on the lights"], keywords=[["kitchen"]], keyword_weight=0.5)
    got = fn(data_source="asr", solution_str="turn on the light",
             ground_truth={"reference": "turn on the lights", "keywords": ["kitchen"]}, extra_info=None)
    assert got == pytest.approx(want.reward)
    assert fn(data_source="asr", solution_str="x", ground_truth="", extra_info=None) == -1.0


def test_tts_tokens_go_through_token2wav_to_the_intelligibility_scorer(intelligibility: str) -> None:
    responses = ["".join(f"<|s_{t}|>" for t in tokens_for(0)), "".join(f"<|s_{t}|>" for t in tokens_for(1)), "no tokens"]
    samples: list[tuple[str, Any, dict[str, Any]]] = [
        (responses[0], SENTENCES[0], {}), (responses[1], SENTENCES[0], {}), (responses[2], SENTENCES[1], {})]
    with IntelligibilityClient(intelligibility) as client:
        [direct] = client.score([speak(0)], [SENTENCES[0]], reward_mapping="one_minus_tanh_3wer")
    kwargs = {"intelligibility_endpoints": intelligibility, "task": "tts",
              "token2wav": "tests.support.adapters:token2wav"}  # the "package.module:function" form of a YAML config

    batch = batch_manager(custom_reward_fn("compute_score_batch", kwargs), samples)
    assert batch[0]["score"] == pytest.approx(direct.unwrap().reward)
    assert batch[0]["score"] > batch[1]["score"]  # the right sentence is heard as the reference, the wrong one not
    assert batch[0]["transcript"] == direct.unwrap().transcript and batch[0]["wer"] == pytest.approx(direct.unwrap().wer)
    assert batch[2] == {"score": 0.0, "scored": False, "error": "no speech tokens (<|s_N|>) in the completion",
                        "wer": 0.0, "cer": 0.0, "intelligibility": 0.0, "similarity": 0.0, "transcript": ""}

    scores, stacked = asyncio.run(reward_loop(custom_reward_fn("compute_score_async", kwargs), samples[2:]))
    assert scores == [0.0] and stacked["transcript"].dtype.kind == "U" and stacked["scored"].tolist() == [False]


def test_tts_without_token2wav_says_so(intelligibility: str) -> None:
    fn = custom_reward_fn("compute_score", {"intelligibility_endpoints": intelligibility})
    with pytest.raises(Token2WavNotConfigured, match="token2wav backend not configured"):
        fn(data_source="tts", solution_str="<|s_1|><|s_2|>", ground_truth="hello", extra_info={})


def test_a_dead_scorer_gives_the_failure_score_within_the_deadline() -> None:
    dead = f"127.0.0.1:{free_port()}"
    fn = custom_reward_fn("compute_score_batch", {"rules_endpoints": dead, "timeout_s": 2, "max_attempts": 2})
    started = time.monotonic()
    results = fn(data_sources=["a", "b"], solution_strs=["x", "y"], ground_truths=["x", "y"], extra_infos=[{}, {}])
    assert time.monotonic() - started < 5
    assert [r["score"] for r in results] == [0.0, 0.0] and not any(r["scored"] for r in results)
    assert "UNAVAILABLE" in results[0]["error"]
    strict = custom_reward_fn("compute_score", {"rules_endpoints": dead, "timeout_s": 1, "raise_on_service_error": True})
    with pytest.raises(Exception, match="UNAVAILABLE"):
        strict(data_source="a", solution_str="x", ground_truth="x", extra_info=None)
