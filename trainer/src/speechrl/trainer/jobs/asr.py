"""The ASR GRPO job kind: LLM-based ASR through the services, the step the paper alternates on the GPUs.

    encode (audio encoder service) -> rollout (G samples per prompt, rollout service)
    -> score (rule rewards service: R1 accuracy, R2 hallucination, R3 keywords)
    -> update and sync (the driver: GRPO on the trainer's device under its GPU lease, new weights
       to the rollout service)

Every GPU phase takes its device's lease: the encoder and rollout services take theirs per batch,
the driver the update's. Per step: every reward component, WER, insertions, the hallucination
rate; greedy evaluation on eval_split every eval_every steps. The prompts are train_split's rows, or
those a prompt_selection keeps (jobs/selection.py: random, hard cases, under 20 s, keyword-rich),
chosen at the first step and written to <out_dir>/prompts.json. Data-parallel updates under torchrun
and LoRA come from the driver (driver.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from speechrl.client import (
    AsyncAudioEncoderClient,
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncRuleRewardsClient,
)
from speechrl.services.config import option
from speechrl.services.speech_llm import AUDIO, is_speech_llm
from speechrl.trainer.core.advantages import weighted_rewards
from speechrl.trainer.core.step import RolloutBatch, pad_right, sampled_sequences
from speechrl.trainer.jobs.datasets import Row, read_manifest
from speechrl.trainer.jobs.kind import Collected, JobConfig
from speechrl.trainer.jobs.progress import PhaseTimer, mean_of
from speechrl.trainer.jobs.selection import MAX_SECONDS, MIN_DISAGREEMENT, MIN_KEYWORDS, PromptSelection, pick_prompts
from speechrl.trainer.models.asr_policy import LAYOUT_FILE, AsrPolicy, PromptLayout

log = logging.getLogger(__name__)

REWARD_COMPONENTS = ("accuracy", "hallucination", "keyword")
WerMapping = Literal["one_minus_wer", "one_minus_tanh_3wer", "negative_wer"]  # speechrl.rewards.WER_MAPPINGS
PROMPTS_FILE = "prompts.json"  # in out_dir: the selection's settings and the ids of the rows it kept


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
    prompt_selection: PromptSelection = option(
        "all", "Which rows of train_split are the prompts (jobs/selection.py, the paper's RL data sets), chosen at "
               "the first step and kept in <out_dir>/prompts.json (a resumed job reuses them): all; random "
               "(prompt_count rows at random); hard (the rows where the policy's greedy transcript and Whisper's, "
               f"from the intelligibility service, differ by WER > {MIN_DISAGREEMENT}, the most first, and the long "
               f"segments that say a sentence twice); short (audio under {MAX_SECONDS:.0f} s); keyword (references "
               f"with >= {MIN_KEYWORDS} keywords).")
    prompt_count: int = option(0, "At most this many prompts from prompt_selection (hard: the hardest; short, "
                                  "keyword: drawn at random with seed); 0: every row it keeps. random needs it.")
    intelligibility: str = option("", "Intelligibility-scorer endpoint(s) (Whisper): the second system of "
                                      "prompt_selection hard, which alone needs it.")
    accuracy_mapping: WerMapping = option(
        "one_minus_wer", "How WER becomes R1 (speechrl.rewards.WER_MAPPINGS): one_minus_wer is the paper's, "
                         "one_minus_tanh_3wer CosyVoice's GRPO recipe's.")
    accuracy_floor: float = option(0.0, "Lowest R1, in [-10, 0]. 0 is the paper's clip, under which every "
                                        "hypothesis with WER >= 1 scores alike (a long loop as a plain miss); -1 "
                                        "keeps a WER-2 loop below a WER-1 miss, so R1 sees how far it ran on.")
    asr_prompt: str = option("", "A Qwen3-ASR / Qwen2-Audio policy's transcription prompt, with {audio} once where "
                                 "the audio's embeddings go, e.g. Qwen3-ASR's chat turn with another language "
                                 "forced (speech_llm.qwen3_asr_prompt('Chinese')); empty: the family's own "
                                 "(speech_llm.ASR_PROMPTS). Training, rollouts and evaluation all use it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.asr_prompt and self.asr_prompt.count(AUDIO) != 1:
            raise ValueError(f"asr_prompt must hold {AUDIO} exactly once, where the audio's embeddings go; got "
                             f"{self.asr_prompt!r}")
        if not -10.0 <= self.accuracy_floor <= 0.0:
            raise ValueError(f"accuracy_floor must be in [-10, 0] (0: the paper's clip), got {self.accuracy_floor}")
        if self.prompt_count < 0:
            raise ValueError(f"prompt_count must be >= 0 (0: every row the selection keeps), got {self.prompt_count}")
        if self.prompt_selection == "random" and not self.prompt_count:
            raise ValueError("prompt_selection random draws prompt_count rows: set prompt_count > 0")
        if self.prompt_selection == "all" and self.prompt_count:
            raise ValueError(f"prompt_count {self.prompt_count} with prompt_selection all: use prompt_selection "
                             "random to draw that many rows, or prompt_count 0 for all of them")
        if self.prompt_selection == "hard" and not self.intelligibility:
            raise ValueError("prompt_selection hard compares the policy's transcripts with Whisper's: set "
                             "intelligibility to the intelligibility scorer's endpoint (e.g. 127.0.0.1:50051)")


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
        "keyword_precision": [s.keyword_precision if s else None for s in scores],  # 1 where a row has no keywords
        "keyword_recall": [s.keyword_recall if s else None for s in scores],
    }


def rollout_batch(policy: AsrPolicy, audio: Sequence[torch.Tensor], samples: Sequence[Any],
                  rewards: Sequence[float | None]) -> RolloutBatch:
    """The GRPO batch: prompts once each (left-padded embeddings), completions with EOS where sampled."""
    with torch.no_grad():
        prompts = policy.inputs(audio, padding_side="left")  # instruction embeddings: fixed during this step
    ids, mask = pad_right(sampled_sequences(samples, policy.layout.eos_token_id), policy.layout.pad_token_id)  # [N, T]
    return RolloutBatch(completion_ids=ids, completion_mask=mask, rewards=list(rewards),
                        prompt_mask=prompts.attention_mask, prompt_embeds=prompts.inputs_embeds.detach())


async def transcribe(services: Services, rows: Sequence[Row], layout: PromptLayout,
                     cache: EmbeddingCache | None = None) -> list[str]:
    """Greedy transcripts of rows from the rollout service (its current weights), in one request."""
    audio = await encode(services, rows, cache)
    results = await services.rollout.generate(
        [a.numpy() for a in audio], n=1, temperature=0.0,
        max_tokens=max(layout.max_new_tokens(a.shape[0]) for a in audio), **layout.token_ids_around_audio())
    return [r.unwrap()[0].text for r in results]


async def evaluate(services: Services, rows: Sequence[Row], layout: PromptLayout,
                   cache: EmbeddingCache | None = None) -> dict[str, float]:
    """Greedy transcripts of rows from the rollout service (current weights), scored by the rule rewards."""
    components = await score(services, await transcribe(services, rows, layout, cache), rows)
    return {"eval/wer": mean_of(components["wer"]), "eval/insertions": mean_of(components["insertions"]),
            "eval/hallucination_rate": mean_of([None if h is None else float(h < 0) for h in components["hallucination"]])}


async def hard_case_transcripts(config: AsrJobConfig, services: Services, rows: Sequence[Row], layout: PromptLayout,
                                cache: EmbeddingCache | None = None, batch_size: int = 32) -> tuple[list[str], list[str]]:
    """The two systems of prompt_selection hard: Whisper's transcripts of rows (the intelligibility
    service) and the policy's greedy ones (the rollout service), batch_size rows a request, like
    durations together (a batch decodes as long as its longest)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].duration)
    whisper, policy = [""] * len(rows), [""] * len(rows)
    async with AsyncIntelligibilityClient(config.intelligibility, timeout_s=600) as scorer:
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            batch = [rows[i] for i in part]
            scored, greedy = await asyncio.gather(scorer.score([r.audio for r in batch], [r.text for r in batch]),
                                                  transcribe(services, batch, layout, cache))
            for i, result, text in zip(part, scored, greedy, strict=True):
                whisper[i], policy[i] = result.unwrap().transcript, text
    return whisper, policy


async def choose_prompts(config: AsrJobConfig, rows: Sequence[Row], services: Services, layout: PromptLayout,
                         cache: EmbeddingCache | None = None) -> list[Row]:
    """The job's prompts: config.prompt_selection applied to rows (train_split's), their ids written to
    <out_dir>/prompts.json with the settings that chose them; a job whose out_dir holds ids chosen with
    the same settings (a resumed job, or one given another's hard cases: those do not depend on the
    seed) takes those. Called at the first step, when the rollout service serves this job's weights:
    "hard" compares the policy's own transcripts."""
    if config.prompt_selection == "all":
        return list(rows)
    settings = {"prompt_selection": config.prompt_selection, "prompt_count": config.prompt_count,
                "data": config.data, "train_split": config.train_split, "policy": config.policy,
                **({} if config.prompt_selection == "hard" else {"seed": config.seed})}  # hard does not draw
    path = Path(config.out_dir) / PROMPTS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("settings") == settings:
        ids = set(saved["ids"])
        kept = [row for row in rows if row.id in ids]
    else:
        hypotheses = (await hard_case_transcripts(config, services, rows, layout, cache)
                      if config.prompt_selection == "hard" else None)
        kept = pick_prompts(rows, config.prompt_selection, config.prompt_count, config.seed, hypotheses)
        path.write_text(json.dumps({"settings": settings, "ids": [row.id for row in kept]}, indent=2) + "\n")
    if not kept:
        raise ValueError(f"prompt_selection {config.prompt_selection} kept none of the {len(rows)} rows of "
                         f"train_split {config.train_split!r}: add splits that have such rows, or choose another")
    log.info("prompt_selection %s: %d of %d rows of %s are the prompts (%s)", config.prompt_selection, len(kept),
             len(rows), config.train_split, path)
    return kept


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
        self.candidates = read_manifest(config.data, config.train_split)
        self.rows: list[Row] = []  # the prompts: candidates as prompt_selection keeps them, at the first step
        self.eval_rows = read_manifest(config.data, config.eval_split)[:config.eval_size] if config.eval_split else []

    async def collect(self, step: int, timer: PhaseTimer) -> Collected:
        """encode -> rollout -> score for one batch of prompts."""
        grpo, layout = self.grpo, self.policy.layout
        chosen = not self.rows
        if chosen:  # a phase of its own only where it does work: "all" keeps every candidate
            with timer("select") if self.config.prompt_selection != "all" else contextlib.nullcontext():
                self.rows = await choose_prompts(self.config, self.candidates, self.services, layout, self.cache)
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
            **({"prompts": len(self.rows)} if chosen else {}),  # how many rows prompt_selection kept
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
        # LoRA and torchrun both work (not together: the driver refuses that)
        if config.asr_prompt and not is_speech_llm(config.policy):
            raise ValueError(f"asr_prompt is a Qwen3-ASR / Qwen2-Audio checkpoint's prompt; {config.policy} is a "
                             f"SpeechRL LLM-ASR policy, whose instruction is its {LAYOUT_FILE}: drop asr_prompt")

    @contextlib.asynccontextmanager
    async def connect(self, config: AsrJobConfig, policy: AsrPolicy) -> AsyncIterator[AsrSession]:
        if config.asr_prompt:  # rollouts, the update's prompts and evaluation all read the policy's layout
            policy.layout = PromptLayout.of_speech_llm(config.policy, policy.tokenizer, config.asr_prompt)
        cache = self.cache if self.cache is not None else EmbeddingCache(config.embedding_cache)
        async with Services.connect(config) as services:
            session = AsrSession(config, policy, services, cache)
            if config.prefetch_embeddings:
                await cache.prefetch(services, session.candidates)
            yield session
