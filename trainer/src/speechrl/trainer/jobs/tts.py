"""The TTS job kinds: RL of the LLM-TTS policy through the services, by GRPO, DiffRO, or both combined.

    rollout  (G speech-token samples per text, rollout service in SPEECH_TOKENS mode)
    -> token2wav (each sample rendered with its prompt's speaker: an espeak voice, or prompt audio)
    -> score  (intelligibility: Whisper's WER as a reward; speaker: cosine to the prompt voice's
               reference; duration vs the group median; token diversity; F0 spread; token2reward:
               the token2wav service's ScoreTokens, Token2Reward's exp(log P(text | tokens) / chars),
               a cheap reward from the tokens alone, weight 0 unless asked for)
    -> update and sync (the driver: GRPO / DiffRO / GRPO + lambda * filtered DiffRO, core/step.py,
       under the lease; new weights to the rollout service)

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
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import soundfile

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
    SynthesizedSpeech,
)
from speechrl.rewards.tts import diversity_rewards, duration_rewards, f0_std
from speechrl.services.config import option
from speechrl.services.token2wav.token2reward import Token2Reward
from speechrl.services.token2wav.tokens import PhonemeVocabulary
from speechrl.trainer.core.advantages import weighted_rewards
from speechrl.trainer.core.config import LOGIT_LOSSES, LossName
from speechrl.trainer.core.losses import TokenReward
from speechrl.trainer.core.step import RolloutBatch, pad_right, sampled_sequences
from speechrl.trainer.jobs.datasets import read_corpus
from speechrl.trainer.jobs.kind import Collected, JobConfig
from speechrl.trainer.jobs.progress import PhaseTimer, mean_of
from speechrl.trainer.models.token2reward import diffro_reward as token_reward
from speechrl.trainer.models.token2reward import load_frozen
from speechrl.trainer.models.tts_policy import SpeechLayout, TtsPolicy

REWARD_COMPONENTS = ("intelligibility", "speaker", "duration", "diversity", "f0", "token2reward")
# Weights of components not named in a job; the others weigh 1. Diversity and F0 spread reward
# variety, not correctness: logged, acting only when asked. Token2Reward's score needs the token2wav
# server started with --token2reward: off unless asked for.
DEFAULT_WEIGHTS = {"diversity": 0.0, "f0": 0.0, "token2reward": 0.0}


def weight_of(weights: dict[str, float], name: str) -> float:
    """The weight of component `name` in `weights`, DEFAULT_WEIGHTS (else 1) when not named."""
    return weights.get(name, DEFAULT_WEIGHTS.get(name, 1.0))


REFERENCE_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


@dataclass
class TtsJobConfig(JobConfig):
    """An RL run of the LLM-TTS policy; `grpo` holds the update's settings (GRPOConfig), its loss set by the kind."""

    REWARD_COMPONENTS: ClassVar[tuple[str, ...]] = REWARD_COMPONENTS
    DEFAULT_WEIGHTS: ClassVar[Mapping[str, float]] = DEFAULT_WEIGHTS

    policy: str = option("", "Policy folder: a TtsPolicy.save folder, or CosyVoice2's LLM converted by "
                             "`speechrl cosyvoice2 import`.")
    data: str = option("", "corpus.jsonl (jobs/datasets.py) whose rows are the text prompts.")
    train_split: str = option("train", "Corpus split(s) to sample prompts from, comma-separated.")
    voices: str = option("en-us,en-gb+f3,en-us+m7", "espeak voices, the speaker prompts: prompt i speaks with "
                                                   "voices[i % n]; ignored when prompt_audio is set.")
    prompt_audio: str = option("", "Speaker prompts as WAV files, comma-separated, in place of voices: prompt i is "
                                   "spoken like file i % n. token2wav gets the audio (the cosyvoice2 backend's "
                                   "zero-shot speaker; espeak ignores it) and the speaker reward compares with it.")
    reference_text: str = option(REFERENCE_TEXT, "Sentence each voice's reference audio says (the speaker "
                                                 "scorer's reference), rendered once by token2wav at the start.")
    token2reward: str = option("", "Token2Reward folder (token2reward.py): DiffRO's reward model; required by "
                                   "tts-diffro and tts-grpo+diffro.")
    wer_reward: str = option("one_minus_wer", "Intelligibility reward mapping: one_minus_wer or "
                                              "one_minus_tanh_3wer (1 - tanh(3 * WER)).")
    out_dir: str = option("runs/tts-grpo", "Run folder: metrics.jsonl, TensorBoard events, checkpoints, plot.")
    token2wav: str = option("127.0.0.1:50056", "token2wav endpoint(s).")
    intelligibility: str = option("127.0.0.1:50051", "Intelligibility-scorer endpoint(s).")
    speaker: str = option("127.0.0.1:50052", "Speaker-similarity-scorer endpoint(s).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.speaker_list:
            raise ValueError("voices must name at least one espeak voice (or prompt_audio one WAV file)")
        missing = [p for p in self.prompt_audio_list if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"prompt_audio names files that do not exist: {missing}")

    @property
    def prompt_audio_list(self) -> list[str]:
        return [p.strip() for p in self.prompt_audio.split(",") if p.strip()]

    @property
    def speaker_list(self) -> list[str]:
        """The speaker prompts prompts are spoken in turn by: prompt_audio's files, else voices."""
        return self.prompt_audio_list or [v.strip() for v in self.voices.split(",") if v.strip()]


@dataclass(frozen=True)
class Prompt:
    """One text prompt and the speaker it is to be spoken by (an espeak voice or a prompt WAV's path)."""

    text: str
    speaker: str


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


@functools.cache
def prompt_audio_bytes(path: str) -> bytes:
    """A prompt WAV's bytes, read once per run (every rendering of every step sends it)."""
    return Path(path).read_bytes()


async def speaker_references(services: TtsServices, config: TtsJobConfig) -> dict[str, np.ndarray]:
    """Each speaker's embedding: of the prompt audio itself, or of token2wav's rendering of reference_text's
    clean phonemes in each espeak voice."""
    speakers = config.speaker_list
    if config.prompt_audio_list:
        references = [prompt_audio_bytes(p) for p in speakers]
    else:
        tokens = PhonemeVocabulary().text_to_ids(config.reference_text)
        speech = await services.token2wav.synthesize([tokens] * len(speakers), voice=speakers)
        references = [s.unwrap() for s in speech]
    embeddings = await services.speaker.embed(references)
    return {v: e.unwrap() for v, e in zip(speakers, embeddings, strict=True)}


async def render(services: TtsServices, config: TtsJobConfig, token_lists: Sequence[Sequence[int]],
                 speakers: Sequence[str]) -> list[SynthesizedSpeech]:
    """token2wav of each sample by its speaker; an empty sample gets its own error, not a crash."""
    tokens = [list(t) for t in token_lists]
    if config.prompt_audio_list:
        return await services.token2wav.synthesize(tokens, prompt_audio=[prompt_audio_bytes(s) for s in speakers])
    return await services.token2wav.synthesize(tokens, voice=list(speakers))


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
                                               [references[prompts[i].speaker] for i in rendered])
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
    layout = policy.layout
    ids, mask = pad_right(sampled_sequences(samples, layout.eos_id), layout.pad_id)  # [N, T] each
    prompt_ids, prompt_mask = pad_right([layout.prompt_ids(p.text) for p in prompts], layout.pad_id)  # [P, S] each
    return RolloutBatch(completion_ids=ids, completion_mask=mask, rewards=list(rewards), prompt_mask=prompt_mask,
                        prompt_ids=prompt_ids, diffro_reward=diffro_reward)


async def evaluate(services: TtsServices, config: TtsJobConfig, prompts: Sequence[Prompt], layout: SpeechLayout,
                   references: dict[str, np.ndarray], temperature: float = 0.0) -> dict[str, float]:
    """Synthesis of prompts by the rollout service's current weights (greedy by default), rendered by
    token2wav and judged by the real scorers: WER (mean per utterance) and SIM (raw cosine)."""
    budget = max(layout.max_new_tokens(p.text) for p in prompts)
    results = await services.rollout.generate([layout.prompt_ids(p.text) for p in prompts], n=1, max_tokens=budget,
                                              temperature=temperature, seed=config.seed,
                                              speech_token_range=layout.speech_range())
    tokens = [layout.speech_tokens(r.unwrap()[0].token_ids) for r in results]
    speech = await render(services, config, tokens, [p.speaker for p in prompts])
    components = await score(services, config, {}, speech, tokens, prompts, references, group_size=1)
    # An utterance that could not be rendered (no speech tokens) said nothing: WER 1, not a skipped item.
    wers = [1.0 if w is None else w for w in components["wer"]]
    return {"wer": float(np.mean(wers)), "sim": mean_of(components["sim"]),
            "render_failures": float(sum(not s.ok for s in speech)),
            "speech_tokens": float(np.mean([len(t) for t in tokens]))}


def read_prompts(config: TtsJobConfig) -> list[Prompt]:
    """The corpus rows of train_split as prompts, speakers assigned round-robin by row."""
    speakers = config.speaker_list
    return [Prompt(r["text"], speakers[i % len(speakers)])
            for i, r in enumerate(read_corpus(config.data, config.train_split))]


def load_reward_model(config: TtsJobConfig) -> Token2Reward | None:
    """The frozen Token2Reward on the update device, for the losses that read it (DiffRO's)."""
    if config.grpo.loss not in LOGIT_LOSSES:
        return None
    if not config.token2reward:
        raise ValueError(f"loss {config.grpo.loss!r} needs token2reward (a Token2Reward folder, "
                         "recipes/token2reward.py)")
    return load_frozen(config.token2reward, device=config.device)


class TtsSession:
    """One run's services, prompts, voice references and reward model: what a TTS step does before the update."""

    def __init__(self, config: TtsJobConfig, policy: TtsPolicy, services: TtsServices,
                 references: dict[str, np.ndarray], reward_model: Token2Reward | None):
        self.config, self.grpo, self.policy, self.services = config, config.grpo, policy, services
        self.rollout = services.rollout
        self.prompts = read_prompts(config)
        self.references, self.reward_model = references, reward_model

    async def collect(self, step: int, timer: PhaseTimer) -> Collected:
        """rollout -> token2wav -> score for one batch of prompts."""
        grpo, layout = self.grpo, self.policy.layout
        prompts = random.sample(self.prompts, min(grpo.batch_size, len(self.prompts)))
        with timer("rollout"):
            budget = min(grpo.max_completion_length, max(layout.max_new_tokens(p.text) for p in prompts))
            results = await self.services.rollout.generate(
                [layout.prompt_ids(p.text) for p in prompts], n=grpo.group_size, max_tokens=budget,
                temperature=grpo.temperature, seed=self.config.seed * 100_003 + step,
                speech_token_range=layout.speech_range())
            samples = [s for r in results for s in r.unwrap()]  # P * G, group order
        group_prompts = [p for p in prompts for _ in range(grpo.group_size)]
        tokens = [layout.speech_tokens(s.token_ids) for s in samples]
        with timer("token2wav"):
            speech = await render(self.services, self.config, tokens, [p.speaker for p in group_prompts])
        with timer("score"):
            components = await score(self.services, self.config, grpo.reward_weights, speech, tokens, group_prompts,
                                     self.references, grpo.group_size)
        rewards = weighted_rewards({k: components[k] for k in REWARD_COMPONENTS}, grpo.reward_weights)
        diffro_reward = None
        if self.reward_model is not None:
            diffro_reward = token_reward(self.reward_model, [p.text for p in group_prompts], layout.speech_range(),
                                         (layout.eos_id,))
        metrics: dict[str, Any] = {
            **{f"reward/{k}": mean_of(components[k]) for k in REWARD_COMPONENTS},
            "wer": mean_of(components["wer"]), "sim": mean_of(components["sim"]),
            "audio_seconds": mean_of([s.duration_seconds if s.ok else None for s in speech]),
            "render_failures": float(sum(not s.ok for s in speech)),
            "completion_tokens": float(np.mean([len(s.token_ids) for s in samples])),
        }
        return Collected(rollout_batch(self.policy, prompts, samples, rewards, diffro_reward),
                         [s.policy_version for s in samples], metrics)

    async def evaluate(self, step: int, last: bool) -> dict[str, float]:
        return {}  # the reproduction evaluates the served weights (recipes/reproduce_tts.py)


class TtsRl:
    """A TTS job kind (tts-grpo, tts-diffro, tts-grpo+diffro): the kind sets grpo.loss."""

    config_class = TtsJobConfig
    policy_class = TtsPolicy
    plot_components = {f"reward/{name}": name for name in REWARD_COMPONENTS}
    summary_keys = ("reward_mean", "wer", "sim")

    def __init__(self, name: str, loss: LossName):
        self.name, self.loss = name, loss

    def job_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        grpo = dict(values.get("grpo") or {})
        self._check_loss(grpo.setdefault("loss", self.loss))
        return {**values, "grpo": grpo}

    def check(self, config: TtsJobConfig, distributed: bool) -> None:
        self._check_loss(config.grpo.loss)
        if distributed:
            raise ValueError(f"{self.name} runs in one process: its DiffRO reward does not travel to other ranks; "
                             "run it without torchrun")

    def _check_loss(self, loss: str) -> None:
        if loss != self.loss:
            raise ValueError(f"{self.name} jobs use loss {self.loss!r}; grpo.loss says {loss!r}: drop it or change kind")

    @contextlib.asynccontextmanager
    async def connect(self, config: TtsJobConfig, policy: TtsPolicy) -> AsyncIterator[TtsSession]:
        async with TtsServices.connect(config) as services:
            yield TtsSession(config, policy, services, await speaker_references(services, config),
                             load_reward_model(config))


KINDS = (TtsRl("tts-grpo", "grpo"), TtsRl("tts-diffro", "diffro"), TtsRl("tts-grpo+diffro", "grpo+diffro"))
