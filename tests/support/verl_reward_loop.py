"""verl 0.9.1's reward-loop calling code, reproduced statement for statement, for the verl adapter's tests.

verl cannot be imported in the test environment: `import verl` imports ray (verl/protocol.py), its
wheel pins transformers<5.11 (we have 5.24), and it ships top-level `tests` and `scripts` packages that
would shadow ours. So the code a verl 0.9.1 trainer runs between the config and our function is
copied here, each piece naming its upstream file (the config read by item instead of attribute, so a
plain dict does too); UPSTREAM_LINES lists the upstream lines it copies, and the tests check them
against the unpacked 0.9.1 wheel, so a drift shows.

- verl/trainer/ppo/reward.py: get_custom_reward_fn reads `config.reward.custom_reward_function`
  ({path, name, reward_kwargs}) and wraps the function in partial(_call_with_kwargs[_async], ...),
  the YAML reward_kwargs winning over the call's own keywords.
- verl/experimental/reward_loop/reward_manager/naive.py, NaiveRewardManager.run_single: one call per
  sample with data_source=, solution_str=, ground_truth=, extra_info= (extra_info gains num_turns and
  rollout_reward_scores); a coroutine function is awaited on the worker's loop, a plain one runs in
  the loop's default thread pool.
- .../reward_manager/remote.py, RemoteRewardManager: refuses coroutine functions, and calls the
  function in `reward.num_workers` Ray actors (separate processes, the function pickled once at
  construction), round-robin. Reproduced with one-process pools started with "spawn".
- verl/experimental/reward_loop/reward_loop.py: RewardLoopWorker.compute_score_batch gathers
  run_single over its samples; RewardLoopManager.compute_rm_score puts each "reward_score" into a
  float32 rm_scores row at the last valid response token (RewardManagerBase.assemble_rm_scores,
  reward_manager/base.py) and stacks every key of the first reward_extra_info over all samples.
- verl/workers/reward_manager/batch.py, BatchRewardManager: the legacy batch manager (verl 0.7.0's
  `reward_manager.name=batch`); still in the 0.9.1 wheel, but not in the reward-loop registry.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

VERL_VERSION = "0.9.1"

# (file in the wheel, upstream line) for every line copied below; whitespace is normalised when compared.
UPSTREAM_LINES = (
    ("verl/trainer/ppo/reward.py", 'reward_fn_config = config.reward.get("custom_reward_function") or {}'),
    ("verl/trainer/ppo/reward.py", 'reward_kwargs = dict(reward_fn_config.get("reward_kwargs", {}))'),
    ("verl/trainer/ppo/reward.py", "merged_kwargs = {**kwargs, **extra_kwargs}"),
    ("verl/trainer/ppo/reward.py", "return partial(_call_with_kwargs_async, raw_fn, reward_kwargs)"),
    ("verl/utils/import_utils.py", 'module_name = module_path[len(PKG_PATH_PREFIX) :].replace("/", ".")'),
    (
        "verl/experimental/reward_loop/reward_manager/naive.py",
        "result = await self.compute_score( data_source=data_source, solution_str=response_str, "
        "ground_truth=ground_truth, extra_info=extra_info, **extra_reward_kwargs, )",
    ),
    (
        "verl/experimental/reward_loop/reward_manager/naive.py",
        "lambda: self.compute_score( data_source=data_source, solution_str=response_str, "
        "ground_truth=ground_truth, extra_info=extra_info, **extra_reward_kwargs, ),",
    ),
    (
        "verl/experimental/reward_loop/reward_manager/naive.py",
        'extra_info["num_turns"] = num_turns extra_info["rollout_reward_scores"] = rollout_reward_scores',
    ),
    (
        "verl/experimental/reward_loop/reward_manager/naive.py",
        'if isinstance(result, dict): score = result["score"] for key, value in result.items(): '
        'reward_extra_info[key] = value else: score = result reward_extra_info["acc"] = score',
    ),
    (
        "verl/experimental/reward_loop/reward_manager/remote.py",
        'assert not self.is_async_reward_score, "Async reward score is not supported in remote reward manager. "',
    ),
    (
        "verl/experimental/reward_loop/reward_manager/remote.py",
        "result = await reward_worker.compute_score.remote( data_source=data_source, solution_str=response_str, "
        "ground_truth=ground_truth, extra_info=extra_info, **extra_reward_kwargs, )",
    ),
    ("verl/experimental/reward_loop/reward_manager/remote.py", "return self.compute_score_fn(**kwargs)"),
    (
        "verl/experimental/reward_loop/reward_loop.py",
        "non_tensor_batch[key] = np.array([info[key] for info in reward_extra_infos])",
    ),
    (
        "verl/experimental/reward_loop/reward_manager/base.py",
        'rm_scores = torch.zeros_like(data.batch["responses"], dtype=torch.float32)',
    ),
    (
        "verl/workers/reward_manager/batch.py",
        "scores = self.compute_score( data_sources=data_sources, solution_strs=responses_str, "
        "ground_truths=ground_truths, extra_infos=extras, **self.reward_kwargs, )",
    ),
)


# ---- verl/trainer/ppo/reward.py and verl/utils/import_utils.py ----


def _call_with_kwargs(raw_fn: Callable[..., Any], extra_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    merged_kwargs = {**kwargs, **extra_kwargs}
    return raw_fn(*args, **merged_kwargs)


async def _call_with_kwargs_async(
    raw_fn: Callable[..., Any], extra_kwargs: dict[str, Any], *args: Any, **kwargs: Any
) -> Any:
    merged_kwargs = {**kwargs, **extra_kwargs}
    return await raw_fn(*args, **merged_kwargs)


def get_custom_reward_fn(config: Mapping[str, Any]) -> Callable[..., Any] | None:
    """The reward function a 0.9.1 trainer calls, or None (verl then falls back to default_compute_score)."""
    reward_fn_config = config["reward"].get("custom_reward_function") or {}
    module_path = reward_fn_config.get("path")
    if not module_path:
        return None
    fn_name = reward_fn_config.get("name")
    assert fn_name is not None
    assert module_path.startswith("pkg://"), "only load_module's pkg:// form is reproduced"
    raw_fn = getattr(importlib.import_module(module_path[len("pkg://") :].replace("/", ".")), fn_name)
    reward_kwargs = dict(reward_fn_config.get("reward_kwargs", {}))
    if not inspect.iscoroutinefunction(raw_fn):
        return partial(_call_with_kwargs, raw_fn, reward_kwargs)
    return partial(_call_with_kwargs_async, raw_fn, reward_kwargs)


# ---- the reward loop's managers ----


@dataclass
class Sample:
    """What run_single reads of one sample: the decoded response and the non-tensor fields."""

    response: str  # tokenizer.decode(valid_response_ids, skip_special_tokens=True)
    ground_truth: Any  # non_tensor_batch["reward_model"]["ground_truth"]
    extra_info: dict[str, Any] = field(default_factory=dict)  # non_tensor_batch["extra_info"]
    data_source: str = "speech"
    response_length: int = 4  # valid response tokens: where assemble_rm_scores puts the score


def _reward_output(result: Any) -> dict[str, Any]:
    """naive.py / remote.py after the call: a dict gives "score" and every key, a number gives "acc"."""
    reward_extra_info: dict[str, Any] = {}
    if isinstance(result, dict):
        score = result["score"]
        for key, value in result.items():
            reward_extra_info[key] = value
    else:
        score = result
        reward_extra_info["acc"] = score
    return {"reward_score": score, "reward_extra_info": reward_extra_info}


def _call_kwargs(sample: Sample) -> dict[str, Any]:
    extra_info = sample.extra_info  # verl mutates the batch's own dict, as here
    extra_info["num_turns"] = None  # non_tensor_batch.get("__num_turns__", None): no multi-turn rollout
    extra_info["rollout_reward_scores"] = {}  # non_tensor_batch.get("reward_scores", {})
    # reward_router_address and reward_model_tokenizer join only with a reward model (reward.reward_model.enable)
    extra_reward_kwargs: dict[str, Any] = {}
    return dict(
        data_source=sample.data_source,
        solution_str=sample.response,
        ground_truth=sample.ground_truth,
        extra_info=extra_info,
        **extra_reward_kwargs,
    )


class NaiveRewardManager:
    """reward_manager/naive.py, registered as "naive" (verl 0.9.1's default)."""

    def __init__(self, config: Mapping[str, Any], compute_score: Callable[..., Any]):
        self.compute_score = compute_score
        self.is_async_reward_score = inspect.iscoroutinefunction(compute_score)

    async def run_single(self, sample: Sample) -> dict[str, Any]:
        kwargs = _call_kwargs(sample)
        if self.is_async_reward_score:
            result = await self.compute_score(**kwargs)
        else:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: self.compute_score(**kwargs))
        return _reward_output(result)

    def close(self) -> None:
        pass


_WORKER_FN: Callable[..., Any] | None = None


def _start_reward_compute_worker(compute_score_fn: Callable[..., Any]) -> None:
    global _WORKER_FN  # RewardComputeWorker.__init__: one per process, as one Ray actor
    _WORKER_FN = compute_score_fn


def _reward_compute_worker_call(**kwargs: Any) -> Any:
    assert _WORKER_FN is not None
    return _WORKER_FN(**kwargs)


class RemoteRewardManager:
    """reward_manager/remote.py, registered as "remote": sync functions only, in worker processes."""

    def __init__(self, config: Mapping[str, Any], compute_score: Callable[..., Any]):
        self.compute_score = compute_score
        self.is_async_reward_score = inspect.iscoroutinefunction(compute_score)
        assert not self.is_async_reward_score, "Async reward score is not supported in remote reward manager. "
        spawn = multiprocessing.get_context("spawn")  # a Ray actor is a fresh process, not a fork
        self.reward_worker = [
            ProcessPoolExecutor(
                max_workers=1, mp_context=spawn, initializer=_start_reward_compute_worker, initargs=(compute_score,)
            )
            for _ in range(config["reward"]["num_workers"])
        ]
        self.reward_worker_pool = itertools.cycle(self.reward_worker)

    async def run_single(self, sample: Sample) -> dict[str, Any]:
        kwargs = _call_kwargs(sample)
        worker = next(self.reward_worker_pool)
        result = await asyncio.get_running_loop().run_in_executor(
            worker, partial(_reward_compute_worker_call, **kwargs)
        )
        return _reward_output(result)

    def close(self) -> None:
        for worker in self.reward_worker:
            worker.shutdown()


REWARD_MANAGER: dict[str, type[NaiveRewardManager] | type[RemoteRewardManager]] = {
    "naive": NaiveRewardManager,
    "remote": RemoteRewardManager,
}


def load_reward_manager(config: Mapping[str, Any]) -> NaiveRewardManager | RemoteRewardManager:
    """reward.py:load_reward_manager with a custom function (source "register")."""
    compute_score = get_custom_reward_fn(config)
    assert compute_score is not None, "no reward.custom_reward_function.path: verl would use default_compute_score"
    return REWARD_MANAGER[config["reward"]["reward_manager"]["name"]](config, compute_score)


async def _compute_score_batch(
    manager: NaiveRewardManager | RemoteRewardManager, samples: Sequence[Sample]
) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(manager.run_single(s) for s in samples)))


def compute_rm_score(config: Mapping[str, Any], samples: Sequence[Sample]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What the trainer receives: rm_scores [B, T] float32 and the stacked reward_extra_info.

    One reward-loop worker: verl splits the batch over `reward.num_workers` of them, each doing this.
    """
    manager = load_reward_manager(config)
    try:
        outputs = asyncio.run(_compute_score_batch(manager, samples))
    finally:
        manager.close()
    lengths = np.array([s.response_length for s in samples])  # [B]
    rm_scores = np.zeros((len(samples), lengths.max() + 2), dtype=np.float32)  # [B, T]
    rm_scores[np.arange(len(samples)), lengths - 1] = [o["reward_score"] for o in outputs]
    infos = [o.get("reward_extra_info", {}) for o in outputs]
    return rm_scores, {key: np.array([info[key] for info in infos]) for key in infos[0]}


def legacy_batch_manager(compute_score: Callable[..., Any], samples: Sequence[Sample]) -> list[Any]:
    """verl/workers/reward_manager/batch.py, BatchRewardManager.verify: one call for the whole batch."""
    data_sources = np.array([s.data_source for s in samples], dtype=object)
    extras = np.empty(len(samples), dtype=object)
    extras[:] = [s.extra_info for s in samples]
    for i in range(len(samples)):
        extras[i]["rollout_reward_scores"] = {}
    return list(
        compute_score(
            data_sources=data_sources,
            solution_strs=[s.response for s in samples],
            ground_truths=[s.ground_truth for s in samples],
            extra_infos=extras,
        )
    )
