"""TRL's GRPOTrainer trains two steps with our reward functions calling the real rule-reward service.

The policy is a tiny random Qwen2 with an offline tokenizer (speechrl.services.rollout.tiny); the
rewards TRL logged (its per-step means and the last batch's completion table) must equal what the
service answers for the same completions. The reward functions are also called as TRL calls them
(`trl/trainer/grpo_trainer.py:_calculate_rewards`, TRL 1.16): keyword arguments prompts,
completions, completion_ids, every dataset column, trainer_state, log_extra and log_metric.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from speechrl.adapters import CallPolicy, RuleWeights
from speechrl.adapters.trl import (
    AsyncIntelligibilityReward,
    AsyncRuleReward,
    IntelligibilityReward,
    RuleReward,
    SpeakerSimilarityReward,
)
from speechrl.client import RetryPolicy, RuleRewardsClient
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.servers import serve_in_thread

ROWS = [
    {"prompt": "the cat sat on", "reference": "the cat sat on the mat", "keywords": ["mat"]},
    {"prompt": "turn on the", "reference": "turn on the light", "keywords": ["light"]},
    {"prompt": "hello", "reference": "", "keywords": []},  # the service refuses an empty reference: None
    {"prompt": "what time", "reference": "what time is it", "keywords": []},
]


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    # A few ms of batching wait, as on a GPU box: the two reward functions' concurrent calls share batches.
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), max_wait_ms=5))) as running:
        yield f"127.0.0.1:{running.port}"


class Recorder:
    """A reward function that only records what TRL passed (it returns None: no reward)."""

    __name__ = "recorder"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 **kwargs: Any) -> list[float | None]:
        self.calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
        return [None] * len(completions)


def service_rewards(endpoint: str, completions: list[str], references: list[str],
                    keywords: list[list[str]]) -> list[float]:
    """The service's rewards (weights 1, 1, 0.5); NaN where it could not score, as TRL logs None."""
    with RuleRewardsClient(endpoint) as client:
        results = client.score(completions, references, keywords=keywords, keyword_weight=0.5)
    return [math.nan if r.reward is None else r.reward for r in results]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5's renames, called from inside TRL
def test_grpo_trainer_logs_the_service_rewards(rules: str, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from speechrl.services.rollout.tiny import build_tiny_qwen2

    model = build_tiny_qwen2(tmp_path / "policy", hidden_size=64, num_layers=1)
    weights = RuleWeights(keyword=0.5)
    sync_reward = RuleReward(rules, weights=weights)
    async_reward = AsyncRuleReward(rules, weights=weights, name="asr_rules_async")
    recorder = Recorder()
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=6, max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                      log_completions=False)
    reward_funcs: list[Any] = [sync_reward, async_reward, recorder]  # TRL's type hint predates async reward funcs
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args,
                          train_dataset=Dataset.from_list(ROWS))
    trainer.train()

    steps = [h for h in trainer.state.log_history if "rewards/asr_rules/mean" in h]
    assert len(steps) == 2 and len(recorder.calls) == 2
    for call, logged in zip(recorder.calls, steps, strict=True):
        assert set(call) >= {"reference", "keywords", "trainer_state", "log_extra", "log_metric"}
        expected = service_rewards(rules, call["completions"], call["reference"], call["keywords"])
        assert logged["rewards/asr_rules/mean"] == pytest.approx(float(np.nanmean(expected)), abs=1e-6)
        assert logged["rewards/asr_rules_async/mean"] == pytest.approx(float(np.nanmean(expected)), abs=1e-6)
        # the rows with an empty reference were not scored, and said so in TRL's metrics
        unscored = sum(r == "" for r in call["reference"]) / len(call["reference"])
        assert logged["asr_rules/unscored_frac"] == pytest.approx(unscored)

    # The completion table of the last step: per-completion rewards equal the service's answers.
    last = recorder.calls[-1]
    logs: dict[str, Any] = trainer._logs
    table = list(logs["rewards"]["asr_rules"])
    assert list(logs["completion"]) == last["completions"]
    expected = service_rewards(rules, last["completions"], last["reference"], last["keywords"])
    np.testing.assert_allclose(table, expected, atol=1e-6)  # NaN where the service could not score
    np.testing.assert_allclose(list(logs["rewards"]["asr_rules_async"]), np.asarray(expected), atol=1e-6)
    # ... and so do the components it logged per completion.
    with RuleRewardsClient(rules) as client:
        wers = [r.score.wer if r.score else None for r in client.score(last["completions"], last["reference"])]
    assert list(logs["extra"]["asr_rules/wer"]) == pytest.approx(wers)
    assert len(set(np.nan_to_num(table, nan=-9))) >= 2  # rewards differ between rows (NaN: not scored)


def trl_call(reward: Any, completions: list[Any], **columns: Any) -> Any:
    """Call a reward function the way GRPOTrainer._calculate_rewards does."""
    logged: dict[str, Any] = {}
    kwargs = {**columns, "trainer_state": object(), "log_extra": lambda k, v: logged.__setitem__(k, v),
              "log_metric": lambda k, v: logged.__setitem__(k, v)}
    out = reward(prompts=["p"] * len(completions), completions=completions,
                 completion_ids=[[1, 2]] * len(completions), **kwargs)
    return (asyncio.run(out) if asyncio.iscoroutine(out) else out), logged


def test_conversational_completions_slices_and_pickling(rules: str) -> None:
    reward = RuleReward(rules)
    completions = [[{"role": "assistant", "content": "the cat sat on the mat"}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "turn on the light"}]}]]
    whole, logged = trl_call(reward, completions, reference=["the cat sat on the mat", "turn on the light"])
    assert whole == [1.0, 1.0] and logged["asr_rules/unscored_frac"] == 0.0 and logged["asr_rules/wer"] == [0.0, 0.0]
    # A process holding one item of the group gets that item's reward: no cross-item state.
    part, _ = trl_call(reward, completions[1:], reference=["turn on the light"])
    assert part == whole[1:]
    # TRL's async rollout worker pickles reward functions into a spawned process.
    clone = pickle.loads(pickle.dumps(AsyncRuleReward(rules)))
    assert clone.__name__ == "asr_rules" and trl_call(clone, ["a b"], reference=["a b"])[0] == [1.0]


def test_a_missing_column_is_an_error_naming_it(rules: str) -> None:
    with pytest.raises(KeyError, match="no column 'transcript'.*'reference'"):
        trl_call(RuleReward(rules, reference_column="transcript"), ["x"], reference=["x"])


def test_a_dead_scorer_gives_none_within_the_deadline() -> None:
    dead = f"127.0.0.1:{free_port()}"
    reward = RuleReward(dead, policy=CallPolicy(timeout_s=1.0, retry=RetryPolicy(max_attempts=2)))
    started = time.monotonic()
    rewards, logged = trl_call(reward, ["a", "b"], reference=["a", "b"])
    assert rewards == [None, None] and logged["asr_rules/unscored_frac"] == 1.0
    assert time.monotonic() - started < 3
    zero = RuleReward(dead, policy=CallPolicy(timeout_s=0.5, failure_reward=0.0))
    assert trl_call(zero, ["a"], reference=["a"])[0] == [0.0]


def test_speech_rewards_need_exactly_one_audio_source_and_say_when_token2wav_is_missing() -> None:
    with pytest.raises(ValueError, match="exactly one audio source"):
        IntelligibilityReward("127.0.0.1:1")
    with pytest.raises(ValueError, match="exactly one audio source"):
        SpeakerSimilarityReward("127.0.0.1:1", audio_column="audio", token2wav=lambda t: [])
    reward = AsyncIntelligibilityReward("127.0.0.1:1", token2wav=None, to_audio=lambda **kw: [None])
    rewards, _ = trl_call(reward, ["<|s_1|>"], reference=["hi"])
    assert rewards == [None]  # to_audio made no audio: not scored


def test_adapters_do_not_import_torch() -> None:
    probe = "import sys, speechrl.adapters, speechrl.adapters.trl, speechrl.adapters.verl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_async_rewards_refuse_a_trl_that_would_not_await_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRL below 1.14.0 calls an async reward object without awaiting it ("'coroutine' object is not iterable"
    mid-training): the Async* classes refuse to be built there, naming both versions; the sync ones work."""
    import speechrl.adapters.trl as adapter

    monkeypatch.setattr(adapter, "installed_trl", lambda: "1.13.0")
    with pytest.raises(RuntimeError, match=r"AsyncRuleReward needs TRL >= 1\.14\.0.*trl 1\.13\.0 is installed"):
        AsyncRuleReward("127.0.0.1:1")
    RuleReward("127.0.0.1:1")
    monkeypatch.setattr(adapter, "installed_trl", lambda: "1.14.0")
    AsyncRuleReward("127.0.0.1:1")
