"""The ASR GRPO job kind: LLM-based ASR through the services, the step the paper alternates on the GPUs.

    encode (audio encoder service) -> rollout (G samples per prompt, rollout service)
    -> score (rule rewards service: R1 accuracy, R2 hallucination, R3 keywords)
    -> update and sync (the driver: GRPO on the trainer's device under its GPU lease, new weights
       to the rollout service)

Every GPU phase takes its device's lease: the encoder and rollout services take theirs per batch,
the driver the update's. Per step: every reward component, WER, insertions, the hallucination
rate; greedy evaluation on eval_split every eval_every steps. Data-parallel updates under torchrun
and LoRA come from the driver (driver.py).
"""

from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from speechrl.client import AsyncAudioEncoderClient, AsyncRolloutClient, AsyncRuleRewardsClient
from speechrl.services.config import option
from speechrl.trainer.core.advantages import weighted_rewards
from speechrl.trainer.core.step import RolloutBatch, pad_right, sampled_sequences
from speechrl.trainer.jobs.datasets import Row, read_manifest
from speechrl.trainer.jobs.kind import Collected, JobConfig
from speechrl.trainer.jobs.progress import PhaseTimer, mean_of
from speechrl.trainer.models.asr_policy import AsrPolicy, PromptLayout

REWARD_COMPONENTS = ("accuracy", "hallucination", "keyword")
WerMapping = Literal["one_minus_wer", "one_minus_tanh_3wer", "negative_wer"]  # speechrl.rewards.WER_MAPPINGS


@dataclass
class AsrJobConfig(JobConfig):
    """A GRPO run for the LLM-ASR; `grpo` holds the update's settings (GRPOConfig)."""

    REWARD_COMPONENTS: ClassVar[tuple[str, ...]] = REWARD_COMPONENTS
    DEFAULT_WEIGHTS: ClassVar[Mapping[str, float]] = {"keyword": 0.0}  # R3 acts only when asked: not every data
    # set carries keywords

    policy: str = option("", "Warm-start checkpoint folder (AsrPolicy.save): the LM, tokenizer, layout, front-end.")
    data: str = option("", "Manifest (jobs/datasets.py) whose rows are the RL prompts.")
    train_split: str = option("train", "Manifest split(s) to sample prompts from, comma-separated; add long "
                                       "segments (e.g. train,long_train) so R2 meets the loops it penalises.")
    eval_split: str = option("dev", "Split evaluated greedily every eval_every steps; empty turns it off.")
    eval_size: int = option(64, "Rows of eval_split evaluated.")
    eval_every: int = option(5, "Evaluate every this many steps (and at the end); 0: only at the end.")
    out_dir: str = option("runs/asr-grpo", "Run folder: metrics.jsonl, TensorBoard events, checkpoints, plot.")
    encoder: str = option("127.0.0.1:50054", "Audio-encoder endpoint(s), comma-separated.")
    rules: str = option("127.0.0.1:50053", "Rule-reward endpoint(s).")
    embedding_cache: int = option(4096, "Utterances whose front-end embeddings are kept in memory (the front-end is "
                                        "frozen: a prompt drawn again skips the encoder service); 0: none.")
    batch_by_split: bool = option(False, "Draw each step's prompts from one split of train_split, the split picked "
                                         "in proportion to its rows: long segments come together, so steps of short "
                                         "prompts are not padded to a long one (several times cheaper on a CPU).")
    prefetch_embeddings: bool = option(False, "Encode every prompt of train_split (up to embedding_cache) once "
                                              "before the first step: worth it when steps will draw them again.")
    accuracy_mapping: WerMapping = option(
        "one_minus_wer", "How WER becomes R1 (speechrl.rewards.WER_MAPPINGS): one_minus_wer is the paper's, "
                         "one_minus_tanh_3wer CosyVoice's GRPO recipe's.")
    accuracy_floor: float = option(0.0, "Lowest R1, in [-10, 0]. 0 is the paper's clip, under which every "
                                        "hypothesis with WER >= 1 scores alike (a long loop as a plain miss); -1 "
                                        "keeps a WER-2 loop below a WER-1 miss, so R1 sees how far it ran on.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -10.0 <= self.accuracy_floor <= 0.0:
            raise ValueError(f"accuracy_floor must be in [-10, 0] (0: the paper's clip), got {self.accuracy_floor}")


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


async def score(services: Services, hypotheses: Sequence[str], rows: Sequence[Row],
                config: AsrJobConfig | None = None) -> dict[str, list[Any]]:
    """Rule-reward components per hypothesis (None where unscored), plus WER and insertions; R1 as
    config's accuracy_mapping and accuracy_floor (None: the service's default, the paper's)."""
    results = await services.rules.score(
        list(hypotheses), [r.text for r in rows], keywords=[list(r.keywords) for r in rows],
        accuracy_mapping=config.accuracy_mapping if config else None,
        accuracy_floor=config.accuracy_floor if config else None)
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


async def evaluate(services: Services, rows: Sequence[Row], layout: PromptLayout,
                   cache: EmbeddingCache | None = None) -> dict[str, float]:
    """Greedy transcripts of rows from the rollout service (current weights), scored by the rule rewards."""
    audio = await encode(services, rows, cache)
    results = await services.rollout.generate(
        [a.numpy() for a in audio], n=1, temperature=0.0,
        max_tokens=max(layout.max_new_tokens(a.shape[0]) for a in audio), **layout.token_ids_around_audio())
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


class AsrSession:
    """One run's services and prompts: what a step of ASR GRPO does before the update."""

    def __init__(self, config: AsrJobConfig, policy: AsrPolicy, services: Services, cache: EmbeddingCache):
        self.config, self.grpo, self.policy, self.services, self.cache = config, config.grpo, policy, services, cache
        self.rollout = services.rollout
        self.rows = read_manifest(config.data, config.train_split)
        self.eval_rows = read_manifest(config.data, config.eval_split)[:config.eval_size] if config.eval_split else []

    async def collect(self, step: int, timer: PhaseTimer) -> Collected:
        """encode -> rollout -> score for one batch of prompts."""
        grpo, layout = self.grpo, self.policy.layout
        rows = draw_prompts(self.rows, grpo.batch_size, self.config.batch_by_split)
        encoded_before = self.cache.misses
        with timer("encode"):
            audio = await encode(self.services, rows, self.cache)  # P x [T_i, D]
        with timer("rollout"):
            budget = max(layout.max_new_tokens(a.shape[0]) for a in audio)
            results = await self.services.rollout.generate(
                [a.numpy() for a in audio], n=grpo.group_size, max_tokens=budget, temperature=grpo.temperature,
                seed=self.config.seed * 100_003 + step, **layout.token_ids_around_audio())
            samples = [s for r in results for s in r.unwrap()]  # P * G, group order
        group_rows = [row for row in rows for _ in range(grpo.group_size)]
        with timer("score"):
            components = await score(self.services, [s.text for s in samples], group_rows, self.config)
        rewards = weighted_rewards({k: components[k] for k in REWARD_COMPONENTS}, grpo.reward_weights)
        metrics: dict[str, Any] = {
            **{f"reward/{k}": mean_of(components[k]) for k in REWARD_COMPONENTS},
            "wer": mean_of(components["wer"]), "insertions": mean_of(components["insertions"]),
            "hallucination_rate": mean_of([None if h is None else float(h < 0) for h in components["hallucination"]]),
            "completion_tokens": float(np.mean([len(s.token_ids) for s in samples])),
            "encoded": self.cache.misses - encoded_before,  # sent to the encoder
        }
        return Collected(rollout_batch(self.policy, audio, samples, rewards), [s.policy_version for s in samples],
                         metrics)

    async def evaluate(self, step: int, last: bool) -> dict[str, float]:
        if self.eval_rows and (last or (self.config.eval_every and step % self.config.eval_every == 0)):
            return await evaluate(self.services, self.eval_rows, self.policy.layout, self.cache)
        return {}


class AsrGrpo:
    """The asr-grpo job kind.

    cache: front-end embeddings to share with the caller (a reproduction evaluates and trains several
    runs on the same utterances); by default each run's own, of config.embedding_cache utterances.
    """

    name = "asr-grpo"
    config_class = AsrJobConfig
    policy_class = AsrPolicy
    plot_components = {"reward/accuracy": "R1 accuracy", "reward/hallucination": "R2 hallucination",
                       "reward/keyword": "R3 keywords"}
    summary_keys = ("reward_mean", "wer", "insertions", "kl")

    def __init__(self, cache: EmbeddingCache | None = None):
        self.cache = cache

    def job_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return dict(values)

    def check(self, config: AsrJobConfig, distributed: bool) -> None:
        pass  # LoRA and torchrun both work (not together: the driver refuses that)

    @contextlib.asynccontextmanager
    async def connect(self, config: AsrJobConfig, policy: AsrPolicy) -> AsyncIterator[AsrSession]:
        cache = self.cache if self.cache is not None else EmbeddingCache(config.embedding_cache)
        async with Services.connect(config) as services:
            session = AsrSession(config, policy, services, cache)
            if config.prefetch_embeddings:
                await cache.prefetch(services, session.rows)
            yield session
