"""RL runs for the LLM-TTS policy through the services: GRPO, DiffRO, and the two combined (issue 7).

    rollout  (G speech-token samples per text, rollout service in SPEECH_TOKENS mode)
    -> token2wav (each sample rendered in its prompt's voice, the speaker prompt)
    -> score  (intelligibility: Whisper's WER as a reward; speaker: cosine to the prompt voice's
               reference; duration vs the group median; token diversity; F0 spread; token2reward:
               the token2wav service's ScoreTokens, Token2Reward's exp(log P(text | tokens) / chars),
               a cheap reward from the tokens alone, weight 0 unless asked for)
    -> update (GRPO / DiffRO / GRPO + lambda * filtered DiffRO, step.grpo_update, under the lease)
    -> sync   (new weights to the rollout service; its reply must echo the new version)

The job kind picks the loss: tts-grpo ("grpo"), tts-diffro ("diffro": R = log P(text | Gumbel-Softmax
tokens) from the Token2Reward model, no audio reward acts), tts-grpo+diffro ("grpo+diffro"; the
sample filter is grpo.diffro_filter). A reward component whose weight is 0 is not computed at all
(a DiffRO run needs no ASR), and is logged as NaN; every other one is logged as reward/<name>.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
    SynthesizedSpeech,
)
from speechrl.rewards.tts import diversity_rewards, duration_rewards, f0_std
from speechrl.services.config import option
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from speechrl.trainer import token2reward
from speechrl.trainer.advantages import reward_statistics, weighted_rewards
from speechrl.trainer.checkpoint import TrainState, latest_checkpoint, load_optimizer, restore_rng
from speechrl.trainer.config import GRPOConfig
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
from speechrl.trainer.losses import LOGIT_LOSSES, TokenReward
from speechrl.trainer.policy import make_optimizer, make_reference
from speechrl.trainer.step import RolloutBatch, grpo_update
from speechrl.trainer.tts_policy import EOS_ID, PAD_ID, TtsLayout, TtsPolicy
from speechrl.trainer.tts_warmstart import read_corpus

REWARD_COMPONENTS = ("intelligibility", "speaker", "duration", "diversity", "f0", "token2reward")
# Weights of components not named in a job; the others weigh 1. Diversity and F0 spread reward
# variety, not correctness: logged, acting only when asked. Token2Reward's score needs the token2wav
# server started with --token2reward: off unless asked for.
DEFAULT_WEIGHTS = {"diversity": 0.0, "f0": 0.0, "token2reward": 0.0}


def weight_of(weights: dict[str, float], name: str) -> float:
    """The weight of component `name` in `weights`, DEFAULT_WEIGHTS (else 1) when not named."""
    return weights.get(name, DEFAULT_WEIGHTS.get(name, 1.0))
KIND_LOSSES = {"tts-grpo": "grpo", "tts-diffro": "diffro", "tts-grpo+diffro": "grpo+diffro"}
REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@dataclass
class TtsJobConfig:
    """An RL run of the LLM-TTS policy; `grpo` holds the update's settings (GRPOConfig), its loss set by the kind."""

    policy: str = option("", "Warm-start checkpoint folder (TtsPolicy.save).")
    data: str = option("", "corpus.jsonl (tts_warmstart.py) whose rows are the text prompts.")
    train_split: str = option("train", "Corpus split(s) to sample prompts from, comma-separated.")
    voices: str = option("en-us,en-gb+f3,en-us+m7", "espeak voices, the speaker prompts: prompt i speaks with "
                                                   "voices[i % n] (cosyvoice2 backends take prompt audio instead).")
    reference_text: str = option(REFERENCE_TEXT, "Sentence each voice's reference audio says (the speaker "
                                                 "scorer's reference), rendered once by token2wav at the start.")
    token2reward: str = option("", "Token2Reward folder (token2reward.py): DiffRO's reward model; required by "
                                   "tts-diffro and tts-grpo+diffro.")
    wer_reward: str = option("one_minus_wer", "Intelligibility reward mapping: one_minus_wer or "
                                              "one_minus_tanh_3wer (1 - tanh(3 * WER)).")
    steps: int = option(20, "Policy updates to run.")
    checkpoint_every: int = option(5, "Write a checkpoint every this many steps (and at the end).")
    out_dir: str = option("runs/tts-grpo", "Run folder: metrics.jsonl, TensorBoard events, checkpoints.")
    rollout: str = option("127.0.0.1:50055", "Rollout-generator endpoint(s).")
    token2wav: str = option("127.0.0.1:50056", "token2wav endpoint(s).")
    intelligibility: str = option("127.0.0.1:50051", "Intelligibility-scorer endpoint(s).")
    speaker: str = option("127.0.0.1:50052", "Speaker-similarity-scorer endpoint(s).")
    sync_dir: str = option("", "Folder the rollout service reads new weights from; empty: <out_dir>/sync.")
    device: str = option("cpu", "Device of the policy update: cpu, or cuda:N.")
    lease_device: str = option("", "Take this device's GPU lease (priority high) around each update; empty: none.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis of the GPU lease.")
    seed: int = option(0, "Seed of prompt sampling and rollouts.")
    grpo: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "GRPOConfig fields (group_size, batch_size, learning_rate, kl_beta, diffro_*, reward_weights, ...)."})

    def __post_init__(self) -> None:
        if not self.policy or not self.data:
            raise ValueError("policy (a TtsPolicy folder) and data (a corpus.jsonl) are required")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not [v for v in self.voices.split(",") if v.strip()]:
            raise ValueError("voices must name at least one espeak voice")
        for name in self.grpo.get("reward_weights", {}):
            if name not in REWARD_COMPONENTS:
                raise ValueError(f"reward_weights names {name!r}; components are {', '.join(REWARD_COMPONENTS)}")
        weights = self.grpo.setdefault("reward_weights", {})
        for name, weight in DEFAULT_WEIGHTS.items():
            weights.setdefault(name, weight)

    @property
    def grpo_config(self) -> GRPOConfig:
        return GRPOConfig.from_dict(self.grpo)

    @property
    def voice_list(self) -> list[str]:
        return [v.strip() for v in self.voices.split(",") if v.strip()]


@dataclass(frozen=True)
class Prompt:
    """One text prompt and the voice it is to be spoken in."""

    text: str
    voice: str


@dataclass
class TtsServices:
    """The clients of one run."""

    rollout: AsyncRolloutClient
    token2wav: AsyncToken2WavClient
    intelligibility: AsyncIntelligibilityClient
    speaker: AsyncSpeakerClient

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, config: TtsJobConfig) -> AsyncIterator[TtsServices]:
        async with AsyncRolloutClient(config.rollout, timeout_s=600) as rollout, \
                AsyncToken2WavClient(config.token2wav, timeout_s=600) as token2wav, \
                AsyncIntelligibilityClient(config.intelligibility, timeout_s=600) as intelligibility, \
                AsyncSpeakerClient(config.speaker, timeout_s=600) as speaker:
            yield cls(rollout, token2wav, intelligibility, speaker)


async def voice_references(services: TtsServices, config: TtsJobConfig) -> dict[str, np.ndarray]:
    """Each voice's speaker embedding, from token2wav's rendering of reference_text's clean phonemes."""
    voices = config.voice_list
    tokens = PhonemeVocabulary().text_to_ids(config.reference_text)
    speech = await services.token2wav.synthesize([tokens] * len(voices), voice=voices)
    embeddings = await services.speaker.embed([s.unwrap() for s in speech])
    return {v: e.unwrap() for v, e in zip(voices, embeddings, strict=True)}


async def render(services: TtsServices, token_lists: Sequence[Sequence[int]],
                 voices: Sequence[str]) -> list[SynthesizedSpeech]:
    """token2wav of each sample in its voice; an empty sample gets its own error, not a crash."""
    return await services.token2wav.synthesize([list(t) for t in token_lists], voice=list(voices))


def _per_group(values: Sequence[float | None], group_size: int,
               reward: Callable[[list[float]], list[float]]) -> list[float | None]:
    """reward() over each group's scored values (None stays None)."""
    out: list[float | None] = [None] * len(values)
    for start in range(0, len(values), group_size):
        kept = [i for i in range(start, start + group_size) if values[i] is not None]
        for i, r in zip(kept, reward([float(values[i]) for i in kept]), strict=True):  # type: ignore[arg-type]
            out[i] = r
    return out


def _f0(speech: SynthesizedSpeech) -> float | None:
    if speech.wav is None:
        return None
    samples, rate = soundfile.read(io.BytesIO(speech.wav), dtype="float32")
    return f0_std(samples, rate)


async def score(services: TtsServices, config: TtsJobConfig, weights: dict[str, float],
                speech: Sequence[SynthesizedSpeech], tokens: Sequence[Sequence[int]], prompts: Sequence[Prompt],
                references: dict[str, np.ndarray], group_size: int) -> dict[str, list[Any]]:
    """Every reward component per sample (None: unscored or not computed), plus WER and SIM (raw cosine)."""
    rendered = [i for i, s in enumerate(speech) if s.ok]
    n = len(speech)
    out: dict[str, list[Any]] = {k: [None] * n for k in (*REWARD_COMPONENTS, "wer", "sim")}

    async def asr() -> None:
        if weight_of(weights, "intelligibility") == 0 or not rendered:
            return
        results = await services.intelligibility.score([speech[i].unwrap() for i in rendered],
                                                       [prompts[i].text for i in rendered], reward_mapping=config.wer_reward)
        for i, r in zip(rendered, results, strict=True):
            out["intelligibility"][i], out["wer"][i] = r.reward, r.score.wer if r.score else None

    async def speaker() -> None:
        if weight_of(weights, "speaker") == 0 or not rendered:
            return
        results = await services.speaker.score([speech[i].unwrap() for i in rendered],
                                               [references[prompts[i].voice] for i in rendered])
        for i, r in zip(rendered, results, strict=True):
            out["speaker"][i], out["sim"][i] = r.reward, r.score.cosine if r.score else None

    async def token_reward() -> None:
        if weight_of(weights, "token2reward") == 0:
            return
        results = await services.token2wav.score_tokens(tokens, [p.text for p in prompts])
        out["token2reward"] = [r.reward for r in results]

    await asyncio.gather(asr(), speaker(), token_reward())
    out["duration"] = _per_group([s.duration_seconds if s.ok else None for s in speech], group_size, duration_rewards)
    out["diversity"] = [d for g in range(0, n, group_size) for d in diversity_rewards(tokens[g:g + group_size])]
    if weight_of(weights, "f0") != 0:
        out["f0"] = await asyncio.to_thread(lambda: [_f0(s) for s in speech])
    return out


def rollout_batch(policy: TtsPolicy, prompts: Sequence[Prompt], samples: Sequence[Any],
                  rewards: Sequence[float | None], diffro_reward: TokenReward | None) -> RolloutBatch:
    """The GRPO batch: word-id prompts once each (right-padded), completions with <eos> where sampled."""
    ids, mask = pad_right(sampled_sequences(samples, EOS_ID), PAD_ID)  # [N, T] each
    prompt_ids, prompt_mask = pad_right([policy.layout.prompt_ids(p.text) for p in prompts], PAD_ID)  # [P, S] each
    return RolloutBatch(completion_ids=ids, completion_mask=mask, rewards=list(rewards), prompt_mask=prompt_mask,
                        prompt_ids=prompt_ids, diffro_reward=diffro_reward)


@dataclass
class Trainer:
    """What a step needs that stays fixed over the run."""

    policy: TtsPolicy
    update: Callable[[RolloutBatch], dict[str, float]]
    services: TtsServices
    config: TtsJobConfig
    grpo: GRPOConfig
    references: dict[str, np.ndarray]
    reward_model: token2reward.Token2Reward | None

    async def step(self, step: int, prompts: Sequence[Prompt], version: int) -> tuple[dict[str, Any], int]:
        """rollout -> token2wav -> score -> update -> sync for one batch of prompts; returns (metrics, version)."""
        grpo, layout, timer = self.grpo, self.policy.layout, PhaseTimer()
        with timer("rollout"):
            budget = min(grpo.max_completion_length, max(layout.max_new_tokens(p.text) for p in prompts))
            results = await self.services.rollout.generate(
                [layout.prompt_ids(p.text) for p in prompts], n=grpo.group_size, max_tokens=budget,
                temperature=grpo.temperature, seed=self.config.seed * 100_003 + step,
                speech_token_range=layout.speech_range())
            samples = [s for r in results for s in r.unwrap()]  # P * G, group order
        check_on_policy([s.policy_version for s in samples], version)
        group_prompts = [p for p in prompts for _ in range(grpo.group_size)]
        tokens = [layout.speech_tokens(s.token_ids) for s in samples]
        with timer("token2wav"):
            speech = await render(self.services, tokens, [p.voice for p in group_prompts])
        with timer("score"):
            components = await score(self.services, self.config, grpo.reward_weights, speech, tokens, group_prompts,
                                     self.references, grpo.group_size)
        rewards = weighted_rewards({k: components[k] for k in REWARD_COMPONENTS}, grpo.reward_weights)
        reward_model = None
        if self.reward_model is not None:
            reward_model = token2reward.diffro_reward(self.reward_model, [p.text for p in group_prompts],
                                                      layout.speech_range(), (EOS_ID,))
        batch = rollout_batch(self.policy, prompts, samples, rewards, reward_model)
        with timer("update"):
            async with update_lease(self.config.lease_device, self.config.redis_url):
                update_metrics = await asyncio.to_thread(self.update, batch)
        with timer("sync"):
            version = await push_weights(self.services.rollout, self.policy.model, sync_dir(self.config), version + 1)
        metrics: dict[str, Any] = {
            **update_metrics, **reward_statistics(rewards, grpo.group_size), **timer.seconds,
            **{f"reward/{k}": mean_of(components[k]) for k in REWARD_COMPONENTS},
            "wer": mean_of(components["wer"]), "sim": mean_of(components["sim"]),
            "audio_seconds": mean_of([s.duration_seconds if s.ok else None for s in speech]),
            "render_failures": float(sum(not s.ok for s in speech)),
            "completion_tokens": float(np.mean([len(s.token_ids) for s in samples])),
            "policy_version": version,
        }
        return metrics, version


async def evaluate(services: TtsServices, config: TtsJobConfig, prompts: Sequence[Prompt], layout: TtsLayout,
                   references: dict[str, np.ndarray], temperature: float = 0.0) -> dict[str, float]:
    """Synthesis of prompts by the rollout service's current weights (greedy by default), rendered by
    token2wav and judged by the real scorers: WER (mean per utterance) and SIM (raw cosine)."""
    budget = max(layout.max_new_tokens(p.text) for p in prompts)
    results = await services.rollout.generate([layout.prompt_ids(p.text) for p in prompts], n=1, max_tokens=budget,
                                              temperature=temperature, seed=config.seed,
                                              speech_token_range=layout.speech_range())
    tokens = [layout.speech_tokens(r.unwrap()[0].token_ids) for r in results]
    speech = await render(services, tokens, [p.voice for p in prompts])
    components = await score(services, config, {}, speech, tokens, prompts, references, group_size=1)
    # An utterance that could not be rendered (no speech tokens) said nothing: WER 1, not a skipped item.
    wers = [1.0 if w is None else w for w in components["wer"]]
    return {"wer": float(np.mean(wers)), "sim": mean_of(components["sim"]),
            "render_failures": float(sum(not s.ok for s in speech)),
            "speech_tokens": float(np.mean([len(t) for t in tokens]))}


def read_prompts(config: TtsJobConfig) -> list[Prompt]:
    """The corpus rows of train_split as prompts, voices assigned round-robin by row."""
    voices = config.voice_list
    return [Prompt(r["text"], voices[i % len(voices)]) for i, r in enumerate(read_corpus(config.data, config.train_split))]


def load_reward_model(config: TtsJobConfig, grpo: GRPOConfig) -> token2reward.Token2Reward | None:
    """The frozen Token2Reward on the update device (its input carries DiffRO's gradient, its weights none)."""
    if grpo.loss not in LOGIT_LOSSES:
        return None
    if not config.token2reward:
        raise ValueError(f"loss {grpo.loss!r} needs token2reward (a Token2Reward folder, token2reward.py)")
    model = token2reward.load(config.token2reward, device=config.device)
    model.requires_grad_(False)
    return model


async def run(config: TtsJobConfig, progress: Progress, kind: str = "tts-grpo") -> dict[str, Any]:
    """Run (or resume) a TTS job of `kind` to config.steps; returns the summary written to summary.json."""
    loss = KIND_LOSSES[kind]
    if config.grpo.get("loss", loss) != loss:
        raise ValueError(f"{kind} jobs use loss {loss!r}; grpo.loss says {config.grpo['loss']!r}: drop it or change kind")
    config = replace(config, grpo={**config.grpo, "loss": loss})
    grpo = config.grpo_config
    if grpo.lora:
        raise ValueError("grpo.lora: TTS jobs train every weight of their small policy; drop lora")
    torch.manual_seed(grpo.seed)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps({"kind": kind, **asdict(config)}, indent=2) + "\n")
    random.seed(config.seed)
    resume = latest_checkpoint(out)
    policy = TtsPolicy.load(resume / "policy" if resume else config.policy, device=config.device)
    policy.model.train()
    needs_reference = grpo.kl_beta > 0 or (loss in LOGIT_LOSSES and grpo.diffro_beta > 0)
    reference = make_reference(TtsPolicy.load(config.policy, device=config.device).model) if needs_reference else None
    optimizer = make_optimizer(policy.model, grpo)
    update = functools.partial(grpo_update, policy.model, reference, optimizer, config=grpo)
    state = TrainState()
    if resume is not None:
        state = TrainState.load(resume)
        load_optimizer(resume, optimizer)
        restore_rng(state)
    prompts = read_prompts(config)
    async with TtsServices.connect(config) as services:
        status = await services.rollout.get_service_status()
        # A restarted rollout service is at version 0, one that ran ahead is past our checkpoint: push
        # ours with a version newer than both, so every later sample is provably ours.
        version = await push_weights(services.rollout, policy.model, sync_dir(config),
                                     max(state.version, status.policy_version) + 1)
        trainer = Trainer(policy, update, services, config, grpo, await voice_references(services, config),
                          load_reward_model(config, grpo))

        async def step(index: int, version: int) -> tuple[dict[str, Any], int]:
            return await trainer.step(index, random.sample(prompts, min(grpo.batch_size, len(prompts))), version)

        await train_loop(out, state, config.steps, progress, step, lambda f: _save(policy, f), optimizer,
                         version=version, checkpoint_every=config.checkpoint_every)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"steps": rows[-1]["step"] if rows else 0,
               **{key: {"first": rows[0][key], "last": rows[-1][key]} for key in ("reward_mean", "wer", "sim")
                  if rows and key in rows[0]}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save(policy: TtsPolicy, checkpoint: Path) -> None:
    policy.save(checkpoint / "policy")


def runner(kind: str) -> Callable[[TtsJobConfig, Progress], Coroutine[Any, Any, dict[str, Any]]]:
    """run() bound to a job kind, for runner.KINDS."""
    return functools.partial(run, kind=kind)
