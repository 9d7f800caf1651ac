"""verl's reward functions, configured as docs/integrations/verl.md says and called as verl 0.9.1 calls them.

verl cannot be imported here (tests/support/verl_reward_loop.py says why), so its 0.9.1 wheel is
unpacked by scripts/bootstrap.sh into <venv>/verl-0.9.1 and read as files:
- its own Hydra config (verl/trainer/config/ppo_trainer.yaml) composes every `bash` block of the doc,
  and the function the composed config names must be ours, with settings ours and a registered manager;
- its sources must still contain every line tests/support/verl_reward_loop.py copies.
The reward managers run as reproduced there (naive, remote, the reward loop's rm_scores and the legacy
batch manager) against the real scorers, and the scores the trainer receives are compared with the
scorers' own answers.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from functools import partial
from pathlib import Path
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
from tests.support.verl_reward_loop import (
    UPSTREAM_LINES,
    VERL_VERSION,
    Sample,
    compute_rm_score,
    get_custom_reward_fn,
    legacy_batch_manager,
)

VERL_FILES = Path(sys.prefix) / f"verl-{VERL_VERSION}"
DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations" / "verl.md"
needs_verl_files = pytest.mark.skipif(
    not (VERL_FILES / "verl" / "version" / "version").is_file(),
    reason=f"verl {VERL_VERSION}'s files are not unpacked at {VERL_FILES}; scripts/bootstrap.sh unpacks them "
    "(verl itself is not installed: importing it needs ray)",
)

# (hypothesis, reference, extra_info); the last has an empty reference: the service's per-item error
ASR = [
    ("turn on the light", "turn on the lights", {"keywords": ["light"]}),
    ("hello hello hello hello hello hello", "hello world", {}),
    ("anything at all", "", {}),
]
ASR_KEYS = {"score", "scored", "error", "wer", "accuracy", "hallucination", "keyword"}


@pytest.fixture(scope="module")
def rules() -> Iterator[str]:
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
def intelligibility() -> Iterator[str]:
    with serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as running:
        yield f"127.0.0.1:{running.port}"


def verl_config(name: str, manager: str, reward_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `reward` group a verl 0.9.1 trainer reads, as the doc's keys set it."""
    return {
        "reward": {
            "custom_reward_function": {
                "path": "pkg://speechrl.adapters.verl",
                "name": name,
                "reward_kwargs": reward_kwargs,
            },
            "reward_manager": {"name": manager},
            "num_workers": 2,
        }
    }


def asr_samples() -> list[Sample]:
    return [Sample(h, g, dict(e), response_length=2 + i) for i, (h, g, e) in enumerate(ASR)]


def received(rm_scores: np.ndarray, samples: list[Sample]) -> list[float]:
    """The scores in rm_scores [B, T], read where verl put them (the last valid response token)."""
    return [float(rm_scores[i, s.response_length - 1]) for i, s in enumerate(samples)]


def expected_rules(endpoint: str) -> list[float | None]:
    with RuleRewardsClient(endpoint) as client:
        return [
            r.reward
            for r in client.score(
                [h for h, _, _ in ASR], [g for _, g, _ in ASR], keywords=[e.get("keywords", []) for _, _, e in ASR]
            )
        ]


# ---- the doc's keys against verl 0.9.1's own config and sources ----


def documented_overrides() -> list[list[str]]:
    """The Hydra overrides of every `bash` block of the doc's verl 0.9 part (above "## Older verl")."""
    text = DOC.read_text()
    assert "\n## Older verl\n" in text
    blocks = re.findall(r"```bash\n(.*?)```", text.split("\n## Older verl\n")[0], flags=re.S)
    return [[token for token in shlex.split(block.replace("\\\n", " ")) if "=" in token] for block in blocks]


def compose_verl_config(overrides: list[str]) -> Any:
    """verl's main_ppo config (`@hydra.main(config_name="ppo_trainer")`) with these command-line overrides."""
    hydra = pytest.importorskip("hydra")
    with hydra.initialize_config_dir(config_dir=str(VERL_FILES / "verl" / "trainer" / "config"), version_base=None):
        return hydra.compose("ppo_trainer", overrides=overrides)


def registered_reward_managers() -> set[str]:
    """The names verl 0.9.1's reward-loop registry accepts: each @register("name") in reward_manager/."""
    names = set()
    for path in (VERL_FILES / "verl" / "experimental" / "reward_loop" / "reward_manager").glob("*.py"):
        tree = ast.parse(path.read_text())
        register = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "verl.experimental.reward_loop.reward_manager"
            for alias in node.names
            if alias.name == "register"
        }
        names |= {
            str(decorator.args[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            for decorator in node.decorator_list
            if isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Name)
            and decorator.func.id in register
            and isinstance(decorator.args[0], ast.Constant)
        }
    return names


@needs_verl_files
def test_the_reproduced_lines_are_verl_0_9_1s() -> None:
    assert (VERL_FILES / "verl" / "version" / "version").read_text().strip() == VERL_VERSION
    for file, line in UPSTREAM_LINES:
        assert " ".join(line.split()) in " ".join((VERL_FILES / file).read_text().split()), f"{file}: {line}"


@needs_verl_files
def test_the_documented_overrides_reach_our_functions_in_verl_0_9_1() -> None:
    blocks = documented_overrides()
    assert len(blocks) >= 3
    managers = registered_reward_managers()
    settings = {f.name for f in fields(speechrl_verl.VerlRewardConfig)}
    for overrides in blocks:
        config = compose_verl_config(overrides)  # a key verl does not have fails here
        fn = get_custom_reward_fn(config)
        assert fn is not None, f"verl would ignore the function and use default_compute_score: {overrides}"
        assert isinstance(fn, partial)  # partial(_call_with_kwargs[_async], raw_fn, reward_kwargs)
        raw_fn, reward_kwargs = fn.args
        assert raw_fn is getattr(speechrl_verl, config.reward.custom_reward_function.name)
        assert config.reward.reward_manager.name in managers
        if config.reward.reward_manager.name == "remote":
            assert not inspect.iscoroutinefunction(raw_fn), "verl's remote manager refuses coroutine functions"
        assert set(reward_kwargs) <= settings, f"not settings of ours: {set(reward_kwargs) - settings}"
        speechrl_verl.VerlRewardConfig.from_kwargs(reward_kwargs)


@needs_verl_files
def test_the_verl_0_7_0_keys_do_not_reach_our_function_in_0_9_1() -> None:
    # Why the doc changed (issue 21): the old keys fail to compose or are silently ignored.
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="use_reward_loop"):
        compose_verl_config(["reward_model.use_reward_loop=False"])
    old = compose_verl_config(
        ["custom_reward_function.path=pkg://speechrl.adapters.verl", "custom_reward_function.name=compute_score_async"]
    )
    assert get_custom_reward_fn(old) is None
    assert "batch" not in registered_reward_managers() and {"naive", "remote"} <= registered_reward_managers()


# ---- the scores the trainer receives ----


def test_asr_scores_the_trainer_receives_are_the_rules_services(rules: str) -> None:
    expected = expected_rules(rules)
    assert expected[2] is None and expected[0] is not None and expected[1] is not None
    want = [expected[0], expected[1], 0.0]  # failure_score for the unscored one
    kwargs = {"rules_endpoints": rules, "task": "asr"}

    for name, manager in (("compute_score_async", "naive"), ("compute_score", "naive"), ("compute_score", "remote")):
        samples = asr_samples()
        rm_scores, extra = compute_rm_score(verl_config(name, manager, kwargs), samples)
        assert received(rm_scores, samples) == pytest.approx(want, rel=1e-6), (name, manager)  # float32
        assert rm_scores.sum() == pytest.approx(sum(want), rel=1e-6)  # and nowhere else in the rows
        assert set(extra) == ASR_KEYS and extra["score"].tolist() == pytest.approx(want)
        assert extra["scored"].tolist() == [True, True, False] and extra["error"][:2].tolist() == ["", ""]
        assert "EMPTY_TEXT" in extra["error"][2]
        assert extra["hallucination"][1] == -1.0 and extra["keyword"][0] > 0

    with pytest.raises(AssertionError, match="Async reward score is not supported in remote reward manager"):
        compute_rm_score(verl_config("compute_score_async", "remote", kwargs), asr_samples())

    batch_fn = get_custom_reward_fn(verl_config("compute_score_batch", "naive", kwargs))
    assert batch_fn is not None
    batch = legacy_batch_manager(batch_fn, asr_samples())
    assert [b["score"] for b in batch] == pytest.approx(want)


def test_floats_labels_as_dicts_and_yaml_strings(rules: str) -> None:
    # return_dict=false and a dict ground truth; values arrive as strings from a YAML config
    config = verl_config(
        "compute_score",
        "naive",
        {"rules_endpoints": rules, "return_dict": "false", "keyword_weight": "0.5", "failure_score": "-1"},
    )
    with RuleRewardsClient(rules) as client:
        [want] = client.score(["turn on the light"], ["turn on the lights"], keywords=[["kitchen"]], keyword_weight=0.5)
    samples = [
        Sample("turn on the light", {"reference": "turn on the lights", "keywords": ["kitchen"]}),
        Sample("x", ""),
    ]
    rm_scores, extra = compute_rm_score(config, samples)
    assert received(rm_scores, samples) == pytest.approx([want.reward, -1.0], rel=1e-6)
    assert set(extra) == {"acc"} and extra["acc"].tolist() == pytest.approx([want.reward, -1.0])


def test_tts_tokens_go_through_token2wav_to_the_intelligibility_scorer(intelligibility: str) -> None:
    responses = [
        "".join(f"<|s_{t}|>" for t in tokens_for(0)),
        "".join(f"<|s_{t}|>" for t in tokens_for(1)),
        "no tokens",
    ]
    truths = [SENTENCES[0], SENTENCES[0], SENTENCES[1]]
    with IntelligibilityClient(intelligibility) as client:
        [direct] = client.score([speak(0)], [SENTENCES[0]], reward_mapping="one_minus_tanh_3wer")
    # token2wav in the "package.module:function" form of a YAML config
    kwargs = {
        "intelligibility_endpoints": intelligibility,
        "task": "tts",
        "token2wav": "tests.support.adapters:token2wav",
    }

    samples = [Sample(r, t) for r, t in zip(responses, truths, strict=True)]
    rm_scores, extra = compute_rm_score(verl_config("compute_score_async", "naive", kwargs), samples)
    scores = received(rm_scores, samples)
    assert scores[0] == pytest.approx(direct.unwrap().reward, rel=1e-6)
    assert scores[0] > scores[1]  # the right sentence is heard as the reference, the wrong one not
    assert extra["transcript"][0] == direct.unwrap().transcript
    assert extra["wer"][0] == pytest.approx(direct.unwrap().wer)
    assert scores[2] == 0.0 and extra["scored"].tolist() == [True, True, False]
    assert extra["transcript"].dtype.kind == "U"

    batch_fn = get_custom_reward_fn(verl_config("compute_score_batch", "naive", kwargs))
    assert batch_fn is not None
    batch = legacy_batch_manager(batch_fn, [Sample(r, t) for r, t in zip(responses, truths, strict=True)])
    assert batch[0]["score"] == pytest.approx(direct.unwrap().reward)
    assert batch[2] == {
        "score": 0.0,
        "scored": False,
        "error": "no speech tokens (<|s_N|>) in the completion",
        "wer": 0.0,
        "cer": 0.0,
        "intelligibility": 0.0,
        "similarity": 0.0,
        "transcript": "",
    }


def test_tts_without_token2wav_says_so(intelligibility: str) -> None:
    config = verl_config("compute_score_async", "naive", {"intelligibility_endpoints": intelligibility})
    with pytest.raises(Token2WavNotConfigured, match="token2wav backend not configured"):
        compute_rm_score(config, [Sample("<|s_1|><|s_2|>", "hello")])


def test_a_dead_scorer_gives_the_failure_score_within_the_deadline() -> None:
    dead = f"127.0.0.1:{free_port()}"
    config = verl_config("compute_score_async", "naive", {"rules_endpoints": dead, "timeout_s": 2, "max_attempts": 2})
    started = time.monotonic()
    rm_scores, extra = compute_rm_score(config, [Sample("x", "x"), Sample("y", "y")])
    assert time.monotonic() - started < 5
    assert not rm_scores.any() and extra["scored"].tolist() == [False, False]
    assert "UNAVAILABLE" in extra["error"][0]
    strict = verl_config(
        "compute_score", "naive", {"rules_endpoints": dead, "timeout_s": 1, "raise_on_service_error": True}
    )
    with pytest.raises(Exception, match="UNAVAILABLE"):
        compute_rm_score(strict, [Sample("x", "x")])
