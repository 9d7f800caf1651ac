"""A GRPO run for LLM-based ASR through the services: the step the paper alternates on the GPUs.

    encode (audio encoder service) -> rollout (G samples per prompt, rollout service)
    -> score (rule rewards service: R1 accuracy, R2 hallucination, R3 keywords)
    -> update (GRPO on the trainer's device, under its GPU lease, priority "high")
    -> sync (new weights to the rollout service; its reply must echo the new version)

Every GPU phase takes its device's lease: the encoder and rollout services take theirs per batch,
the update here. Per step: time of each phase, every reward component, KL, clip fraction, WER,
insertions -> metrics.jsonl and TensorBoard. Checkpoints every `checkpoint_every` steps; a run
started again with the same out_dir resumes from the newest one.

Under torchrun with several processes (`torchrun --nproc-per-node 2 -m speechrl.trainer.cli train
job.yaml`) the update runs data-parallel (distributed.py): rank 0 runs this job, ranks > 0 only
their part of each update, each under the lease of its own device.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechrl.client import AsyncAudioEncoderClient, AsyncRolloutClient, AsyncRuleRewardsClient
from speechrl.services.config import option
from speechrl.trainer import distributed
from speechrl.trainer.advantages import reward_statistics, weighted_rewards
from speechrl.trainer.asr_policy import AsrPolicy
from speechrl.trainer.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_optimizer,
    restore_rng,
)
from speechrl.trainer.config import GRPOConfig
from speechrl.trainer.data import Row, read_manifest
from speechrl.trainer.jobkit import (
    PhaseTimer,
    Progress,
    check_on_policy,
    mean_of,
    pad_right,
    push_weights,
    sampled_sequences,
    sync_dir,
    train_loop,
    update_lease,
)
from speechrl.trainer.policy import apply_lora, make_optimizer, make_reference
from speechrl.trainer.step import RolloutBatch, grpo_update

REWARD_COMPONENTS = ("accuracy", "hallucination", "keyword")


@dataclass
class AsrJobConfig:
    """A GRPO run for the LLM-ASR; `grpo` holds the update's settings (GRPOConfig)."""

    policy: str = option("", "Warm-start checkpoint folder (AsrPolicy.save): the LM, tokenizer, layout, front-end.")
    data: str = option("", "Manifest (data.py) whose rows are the RL prompts.")
    train_split: str = option("train", "Manifest split(s) to sample prompts from, comma-separated; add long "
                                       "segments (e.g. train,long_train) so R2 meets the loops it penalises.")
    eval_split: str = option("dev", "Split evaluated greedily every eval_every steps; empty turns it off.")
    eval_size: int = option(64, "Rows of eval_split evaluated.")
    eval_every: int = option(5, "Evaluate every this many steps (and at the end); 0: only at the end.")
    steps: int = option(20, "Policy updates to run.")
    checkpoint_every: int = option(5, "Write a checkpoint every this many steps (and at the end).")
    out_dir: str = option("runs/asr-grpo", "Run folder: metrics.jsonl, TensorBoard events, checkpoints, plot.")
    encoder: str = option("127.0.0.1:50054", "Audio-encoder endpoint(s), comma-separated.")
    rollout: str = option("127.0.0.1:50055", "Rollout-generator endpoint(s).")
    rules: str = option("127.0.0.1:50053", "Rule-reward endpoint(s).")
    sync_dir: str = option("", "Folder the rollout service reads new weights from; empty: <out_dir>/sync "
                                "(a shared volume in a cluster).")
    device: str = option("cpu", "Device of the policy update: cpu, or cuda:N.")
    lease_device: str = option("", "Take this device's GPU lease (priority high) around each update; empty: none.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis of the GPU lease.")
    seed: int = option(0, "Seed of prompt sampling and rollouts.")
    embedding_cache: int = option(4096, "Utterances whose front-end embeddings are kept in memory (the front-end is "
                                        "frozen: a prompt drawn again skips the encoder service); 0: none.")
    batch_by_split: bool = option(False, "Draw each step's prompts from one split of train_split, the split picked "
                                         "in proportion to its rows: long segments come together, so steps of short "
                                         "prompts are not padded to a long one (several times cheaper on a CPU).")
    prefetch_embeddings: bool = option(False, "Encode every prompt of train_split (up to embedding_cache) once "
                                              "before the first step: worth it when steps will draw them again.")
    grpo: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "GRPOConfig fields (group_size, batch_size, learning_rate, kl_beta, reward_weights, ...)."})

    def __post_init__(self) -> None:
        if not self.policy or not self.data:
            raise ValueError("policy (a warm-start checkpoint) and data (a manifest) are required")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        weights = self.grpo.setdefault("reward_weights", {})
        for name in weights:
            if name not in REWARD_COMPONENTS:
                raise ValueError(f"reward_weights names {name!r}; components are {', '.join(REWARD_COMPONENTS)}")
        weights.setdefault("keyword", 0.0)  # R3 acts only when asked: not every data set carries keywords

    @property
    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig.from_dict(self.grpo)


@dataclass
class Services:
    """The clients of one run."""

    encoder: AsyncAudioEncoderClient
    rollout: AsyncRolloutClient
    rules: AsyncRuleRewardsClient

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, config: AsrJobConfig) -> AsyncIterator[Services]:
        async with AsyncAudioEncoderClient(config.encoder, timeout_s=600) as encoder, \
                AsyncRolloutClient(config.rollout, timeout_s=600) as rollout, \
                AsyncRuleRewardsClient(config.rules, timeout_s=120) as rules:
            yield cls(encoder, rollout, rules)


async def encode(services: Services, rows: Sequence[Row], cache: EmbeddingCache | None = None) -> list[torch.Tensor]:
    """Front-end embeddings [T_i, D] of each row's audio; rows found in cache skip the encoder service."""
    if cache is not None:
        return await cache.encode(services, rows)
    results = await services.encoder.encode([str(row.audio) for row in rows])
    return [torch.from_numpy(np.array(r.unwrap(), dtype=np.float32)) for r in results]


class EmbeddingCache:
    """The encoder service's embeddings [T, D] by audio file, least recently used dropped past max_items.

    The front-end is frozen, so an utterance drawn again as a prompt has the same embeddings: only
    the first draw goes to the encoder service. Keyed by the row's audio path (a manifest's files do
    not change during a run). max_items 0 keeps nothing.
    """

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0  # rows answered from the cache
        self.misses = 0  # rows sent to the encoder service

    async def encode(self, services: Services, rows: Sequence[Row]) -> list[torch.Tensor]:
        keys = [str(row.audio) for row in rows]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))  # each file once
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            results = await services.encoder.encode(missing)
            fresh = {k: torch.from_numpy(np.array(r.unwrap(), dtype=np.float32)) for k, r in zip(missing, results,
                                                                                               strict=True)}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        out = [fresh[k] if k in fresh else self.entries[k] for k in keys]
        for key, value in zip(keys, out, strict=True):
            if self.max_items:
                self.entries[key] = value
                self.entries.move_to_end(key)
        while len(self.entries) > self.max_items:
            self.entries.popitem(last=False)
        return out

    async def prefetch(self, services: Services, rows: Sequence[Row], batch_size: int = 32) -> None:
        """Encode rows ahead of the first step, batch by batch, with a progress bar."""
        from tqdm import tqdm

        todo = [row for row in dict.fromkeys(rows) if str(row.audio) not in self.entries][:self.max_items]
        todo.sort(key=lambda row: row.duration)  # like lengths together: the encoder pads per batch
        for start in tqdm(range(0, len(todo), batch_size), desc="encode prompts", unit="batch", disable=not todo):
            await self.encode(services, todo[start:start + batch_size])


async def score(services: Services, hypotheses: Sequence[str], rows: Sequence[Row]) -> dict[str, list[Any]]:
    """Rule-reward components per hypothesis (None where unscored), plus WER and insertions."""
    results = await services.rules.score(list(hypotheses), [r.text for r in rows],
                                         keywords=[list(r.keywords) for r in rows])
    scores = [r.score for r in results]
    return {
        "accuracy": [s.accuracy_reward if s else None for s in scores],
        "hallucination": [s.hallucination_reward if s else None for s in scores],
        "keyword": [s.keyword_reward if s else None for s in scores],
        "wer": [s.wer if s else None for s in scores],
        "insertions": [s.word_counts.insertions if s else None for s in scores],
    }


def rollout_batch(policy: AsrPolicy, audio: Sequence[torch.Tensor], samples: Sequence[Any],
                  rewards: Sequence[float | None]) -> RolloutBatch:
    """The GRPO batch: prompts once each (left-padded embeddings), completions with EOS where sampled."""
    with torch.no_grad():
        prompts = policy.inputs(audio, padding_side="left")  # instruction embeddings: fixed during this step
    ids, mask = pad_right(sampled_sequences(samples, policy.layout.eos_token_id), policy.layout.pad_token_id)  # [N, T]
    return RolloutBatch(completion_ids=ids, completion_mask=mask, rewards=list(rewards),
                        prompt_mask=prompts.attention_mask, prompt_embeds=prompts.inputs_embeds.detach())


ADAPTER_DIR = "adapter"  # a LoRA run's checkpoint holds only its adapters (the base is the warm start)


def load_policy(config: AsrJobConfig, grpo: GRPOConfig, resume: Path | None, device: str) -> AsrPolicy:
    """The policy to train: the checkpoint's weights when resuming; with LoRA, the warm start plus adapters."""
    if not grpo.lora:
        return AsrPolicy.load(resume / "policy" if resume else config.policy, device=device)
    from peft import PeftModel

    policy = AsrPolicy.load(config.policy, device=device)
    if resume is not None:
        policy.model = PeftModel.from_pretrained(policy.model, resume / "policy" / ADAPTER_DIR, is_trainable=True)
    else:
        policy.model = apply_lora(policy.model, grpo)
    return policy


def save_policy(policy: AsrPolicy, folder: Path, lora: bool) -> None:
    """A checkpoint's weights: the whole policy folder, or only the LoRA adapters."""
    if lora:
        policy.model.save_pretrained(folder / ADAPTER_DIR)
    else:
        policy.save(folder)


async def train_step(step: int, rows: Sequence[Row], policy: AsrPolicy,
                     update: Callable[[RolloutBatch], dict[str, float]], services: Services, config: AsrJobConfig,
                     grpo: GRPOConfig, version: int, cache: EmbeddingCache | None = None) -> tuple[dict[str, Any], int]:
    """encode -> rollout -> score -> update -> sync for one batch of prompts; returns (metrics, version).

    update(batch) is grpo_update on policy.model, or a distributed.DataParallelUpdate that leaves the
    new weights in policy.model.
    """
    timer = PhaseTimer()
    encoded_before = cache.misses if cache is not None else 0
    with timer("encode"):
        audio = await encode(services, rows, cache)  # P x [T_i, D]
    with timer("rollout"):
        budget = max(policy.layout.max_new_tokens(a.shape[0]) for a in audio)
        results = await services.rollout.generate(
            [a.numpy() for a in audio], n=grpo.group_size, max_tokens=budget, temperature=grpo.temperature,
            seed=config.seed * 100_003 + step, suffix_token_ids=list(policy.layout.instruction_ids))
        samples = [s for r in results for s in r.unwrap()]  # P * G, group order
    check_on_policy([s.policy_version for s in samples], version)
    group_rows = [row for row in rows for _ in range(grpo.group_size)]
    with timer("score"):
        components = await score(services, [s.text for s in samples], group_rows)
    rewards = weighted_rewards({k: components[k] for k in REWARD_COMPONENTS}, grpo.reward_weights)
    batch = rollout_batch(policy, audio, samples, rewards)
    with timer("update"):
        async with update_lease(config.lease_device, config.redis_url):
            update_metrics = await asyncio.to_thread(update, batch)
    with timer("sync"):
        version = await push_weights(services.rollout, policy.model, sync_dir(config), version + 1, grpo.lora)
    metrics: dict[str, Any] = {
        **update_metrics, **reward_statistics(rewards, grpo.group_size), **timer.seconds,
        **{f"reward/{k}": mean_of(components[k]) for k in REWARD_COMPONENTS},
        "wer": mean_of(components["wer"]), "insertions": mean_of(components["insertions"]),
        "hallucination_rate": mean_of([None if h is None else float(h < 0) for h in components["hallucination"]]),
        "completion_tokens": float(np.mean([len(s.token_ids) for s in samples])),
        "encoded": cache.misses - encoded_before if cache is not None else len(rows),  # sent to the encoder
        "policy_version": version,
    }
    return metrics, version


async def evaluate(services: Services, rows: Sequence[Row], layout_budget: Callable[[int], int],
                   instruction_ids: Sequence[int], cache: EmbeddingCache | None = None) -> dict[str, float]:
    """Greedy transcripts of rows from the rollout service (current weights), scored by the rule rewards."""
    audio = await encode(services, rows, cache)
    results = await services.rollout.generate(
        [a.numpy() for a in audio], n=1, temperature=0.0, max_tokens=max(layout_budget(a.shape[0]) for a in audio),
        suffix_token_ids=list(instruction_ids))
    components = await score(services, [r.unwrap()[0].text for r in results], rows)
    return {"eval/wer": mean_of(components["wer"]), "eval/insertions": mean_of(components["insertions"]),
            "eval/hallucination_rate": mean_of([None if h is None else float(h < 0) for h in components["hallucination"]])}


def draw_prompts(rows: Sequence[Row], count: int, by_split: bool = False) -> list[Row]:
    """One step's prompts: count rows at random, or (by_split) count rows of one split, the split drawn
    with probability proportional to its rows (every row is still drawn equally often)."""
    if by_split:
        split = random.choice(rows).split
        rows = [row for row in rows if row.split == split]
    return random.sample(list(rows), min(count, len(rows)))


def sharded_update(config: AsrJobConfig, grpo: GRPOConfig) -> distributed.ShardedUpdate:
    """This rank's part of the data-parallel update, from the warm-start weights (rank 0 then sends its own)."""
    model = AsrPolicy.load(config.policy).model
    return distributed.ShardedUpdate(model, make_reference(model), grpo, torch.device(config.device))


async def run(config: AsrJobConfig, progress: Progress, cache: EmbeddingCache | None = None) -> dict[str, Any]:
    """Run (or resume) the GRPO job to config.steps; returns the summary written to summary.json.

    cache: front-end embeddings to share with the caller (a reproduction evaluates and trains several
    runs on the same utterances); by default the run's own, of config.embedding_cache utterances.

    Launched by torchrun with several processes, rank 0 runs the job and ranks > 0 only take part
    in the updates (distributed.follow); they return {} and write nothing.
    """
    grpo = config.grpo_config
    launch = distributed.Launch.from_env()
    if launch is not None:
        distributed.check_shardable(grpo, launch.world_size)
        config = replace(config, device=launch.device(config.device),
                         lease_device=launch.lease_device(config.lease_device))
        control = distributed.init_process_group(torch.device(config.device))
    torch.manual_seed(grpo.seed)
    if launch is not None and not launch.is_main:
        await distributed.follow(sharded_update(config, grpo), control,
                                 lambda: update_lease(config.lease_device, config.redis_url))
        return {}
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps({"kind": "asr-grpo", **asdict(config)}, indent=2) + "\n")
    random.seed(config.seed)
    resume = latest_checkpoint(out)
    if launch is not None and grpo.lora:
        raise ValueError("grpo.lora with torchrun: asr-grpo runs LoRA in one process only; drop lora or torchrun")
    # Data-parallel, rank 0's policy is the unsharded CPU mirror that the I/O reads (distributed.py).
    policy = load_policy(config, grpo, resume, device="cpu" if launch else config.device)
    optimizer: torch.optim.Optimizer | distributed.DataParallelUpdate
    if launch is None:
        policy.model.train()
        # LoRA: the reference is the same model with its adapters off, no copy (policy.make_reference).
        reference = make_reference(policy.model if grpo.lora else
                                   AsrPolicy.load(config.policy, device=config.device).model)
        optimizer = make_optimizer(policy.model, grpo)
        update: Callable[[RolloutBatch], dict[str, float]] = functools.partial(
            grpo_update, policy.model, reference, optimizer, config=grpo)
    else:
        optimizer = update = distributed.DataParallelUpdate(sharded_update(config, grpo), policy.model, control)
    state = TrainState()
    if resume is not None:
        state = TrainState.load(resume)
        load_optimizer(resume, optimizer)
        restore_rng(state)
    rows = read_manifest(config.data, config.train_split)
    eval_rows = read_manifest(config.data, config.eval_split)[:config.eval_size] if config.eval_split else []
    cache = cache if cache is not None else EmbeddingCache(config.embedding_cache)
    async with Services.connect(config) as services:
        if config.prefetch_embeddings:
            await cache.prefetch(services, rows)
        status = await services.rollout.get_service_status()
        # The rollout service may have restarted (version 0) or run ahead of our checkpoint: push our
        # weights with a version newer than both, so every later sample is provably ours.
        version = await push_weights(services.rollout, policy.model, sync_dir(config),
                                     max(state.version, status.policy_version) + 1, grpo.lora)

        async def step(index: int, version: int) -> tuple[dict[str, Any], int]:
            batch_rows = draw_prompts(rows, grpo.batch_size, config.batch_by_split)
            return await train_step(index, batch_rows, policy, update, services, config, grpo, version, cache)

        async def evaluate_due(index: int, last: bool) -> dict[str, float]:
            if eval_rows and (last or (config.eval_every and index % config.eval_every == 0)):
                return await evaluate(services, eval_rows, policy.layout.max_new_tokens, policy.layout.instruction_ids,
                                      cache)
            return {}

        await train_loop(out, state, config.steps, progress, step, lambda f: save_policy(policy, f / "policy", grpo.lora),
                         optimizer, version=version, checkpoint_every=config.checkpoint_every, evaluate=evaluate_due)
    if isinstance(update, distributed.DataParallelUpdate):
        update.close()  # ranks > 0 return
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarize(out: Path) -> dict[str, Any]:
    """First and last values of the headline metrics, and the plot."""
    from speechrl.trainer.plots import plot_run

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/wer" in r]
    summary: dict[str, Any] = {"steps": rows[-1]["step"] if rows else 0}
    for key in ("reward_mean", "wer", "insertions", "kl"):
        if rows and key in rows[0]:
            summary[key] = {"first": rows[0][key], "last": rows[-1][key]}
    if evals:
        summary["eval_wer"] = {"first": evals[0]["eval/wer"], "last": evals[-1]["eval/wer"]}
    summary["plot"] = str(plot_run(rows, out / "training.png"))
    return summary
