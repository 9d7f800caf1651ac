"""Reward functions for TRL's `GRPOTrainer(reward_funcs=[...])`, backed by the SpeechRL scorers.

Each is a callable object with TRL's reward signature,
`(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]`, where kwargs carry
the dataset's other columns (one value per completion) plus TRL's `trainer_state`, `log_extra` and
`log_metric`. The `Async*` variants have `async def __call__`; TRL awaits them on its own event loop,
concurrently with the other async reward functions, since 1.14.0 (its `is_async_callable`, which
looks at a callable object's `__call__`; earlier releases call them without awaiting and fail with
"'coroutine' object is not iterable", so constructing one under an older TRL raises). The sync
classes work with TRL >= 1.0.

- Every item is scored on its own: a process that holds only a slice of a group gets the same
  rewards for its items as one holding the whole group.
- An item that cannot be scored (its own error, a scorer that is down or past its deadline) gets
  `policy.failure_reward`, None by default: TRL turns None into NaN and leaves it out of the group
  baseline (a completion that every reward function leaves None gets advantage 0). The reason is
  logged on the "speechrl.adapters" logger, and `<name>/unscored_frac` goes to TRL's metrics.
- `__name__` is the name TRL logs the reward under (`rewards/<name>/mean`); the objects pickle
  (their channels are reopened on first use), as TRL's async rollout worker needs.

>>> reward = RuleReward("127.0.0.1:50053", reference_column="text")
>>> reward.__name__
'asr_rules'
>>> reward(prompts=["say it"], completions=["the cat sat"], text=["the cat sat on the mat"])  # doctest: +SKIP
[0.5]
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from speechrl.adapters.inputs import as_audio, as_speaker_reference, completion_text, parse_speech_tokens
from speechrl.adapters.scoring import (
    CallPolicy,
    IntelligibilityScorer,
    Outcome,
    RulesScorer,
    RuleWeights,
    SpeakerScorer,
    log_failures,
    run_sync,
)
from speechrl.adapters.token2wav import Token2Wav, is_async_callable, speech_from_tokens
from speechrl.client import AudioLike

# Keyword arguments TRL adds itself; everything else in kwargs is a dataset column.
TRL_KWARGS = frozenset({"trainer_state", "log_extra", "log_metric", "environments"})

ToAudio = Callable[..., Sequence[Any]]
"""`to_audio(prompts=, completions=, completion_ids=, **columns)` -> one audio (or None) per completion; sync or async."""


def column(kwargs: Mapping[str, Any], name: str | None, count: int, owner: str, *, required: bool) -> list[Any] | None:
    """The values of a dataset column for the completions of this call, checked for length."""
    if name is None or name not in kwargs:
        if required:
            columns = sorted(k for k in kwargs if k not in TRL_KWARGS)
            raise KeyError(f"{owner}: the dataset has no column {name!r} (columns passed to reward functions: "
                           f"{columns}); name the right one in the reward's *_column argument")
        return None
    values = list(kwargs[name])
    if len(values) != count:
        raise ValueError(f"{owner}: column {name!r} has {len(values)} values for {count} completions")
    return values


def _keywords(cell: Any) -> list[str]:
    if cell is None:
        return []
    if isinstance(cell, str):
        return [cell] if cell else []
    return [str(k) for k in cell]


class TrlReward:
    """What every TRL reward shares: its name, the call policy, and reporting to TRL's logs."""

    def __init__(self, name: str, policy: CallPolicy, log_components: bool):
        self.__name__ = name
        self.policy = policy
        self.log_components = log_components

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any],
                    completion_ids: Sequence[Sequence[int]] | None, kwargs: Mapping[str, Any]) -> list[Outcome]:
        raise NotImplementedError

    async def rewards(self, prompts: Sequence[Any], completions: Sequence[Any],
                      completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float | None]:
        """The reward of each completion; `policy.failure_reward` (None) where it could not be scored."""
        outcomes = await self.score(prompts, completions, completion_ids, kwargs)
        if len(outcomes) != len(completions):
            raise RuntimeError(f"{self.__name__}: {len(outcomes)} outcomes for {len(completions)} completions")
        log_failures(self.__name__, outcomes)
        self._report(outcomes, kwargs)
        return [o.reward_or(self.policy.failure_reward) for o in outcomes]

    def _report(self, outcomes: Sequence[Outcome], kwargs: Mapping[str, Any]) -> None:
        log_metric, log_extra = kwargs.get("log_metric"), kwargs.get("log_extra")
        if callable(log_metric) and outcomes:
            log_metric(f"{self.__name__}/unscored_frac", sum(o.reward is None for o in outcomes) / len(outcomes))
        if callable(log_extra) and self.log_components:
            names = dict.fromkeys(k for o in outcomes for k in (*o.components, *o.texts))
            for key in names:
                log_extra(f"{self.__name__}/{key}", [o.components.get(key, o.texts.get(key)) for o in outcomes])


class _SyncCall(TrlReward):
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float | None]:
        return run_sync(self.rewards(prompts, completions, completion_ids, **kwargs))


# The first TRL release whose GRPOTrainer awaits an async callable object (trl.trainer.utils.is_async_callable).
TRL_AWAITS_CALLABLE_OBJECTS = (1, 14)


def installed_trl() -> str | None:
    """The installed TRL's version, None without TRL."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trl")
    except PackageNotFoundError:
        return None


def check_trl_awaits(reward: str) -> None:
    """Raise, naming both versions, when the installed TRL would call reward's async __call__ without awaiting."""
    installed = installed_trl()
    if installed is None:  # used outside TRL (awaited by its caller)
        return
    numbers = tuple(int(part) for part in re.findall(r"\d+", installed)[:2])
    if numbers < TRL_AWAITS_CALLABLE_OBJECTS:
        floor = ".".join(map(str, TRL_AWAITS_CALLABLE_OBJECTS))
        raise RuntimeError(f"{reward} needs TRL >= {floor}.0, which awaits async reward objects; trl {installed} is "
                           f"installed and would fail with \"'coroutine' object is not iterable\". Upgrade TRL "
                           f"(pip install 'trl>={floor}') or use the sync class ({reward.removeprefix('Async')}).")


class _AsyncCall(TrlReward):
    def __init__(self, name: str, policy: CallPolicy, log_components: bool):
        check_trl_awaits(type(self).__name__)
        super().__init__(name, policy, log_components)

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                       completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float | None]:
        return await self.rewards(prompts, completions, completion_ids, **kwargs)


class _Rules(TrlReward):
    def __init__(self, endpoints: str | None = None, *, reference_column: str = "reference",
                 keywords_column: str | None = "keywords", language_column: str | None = "language",
                 weights: RuleWeights = RuleWeights(), policy: CallPolicy = CallPolicy(), name: str = "asr_rules",
                 log_components: bool = True):
        super().__init__(name, policy, log_components)
        self.scorer = RulesScorer(endpoints, weights=weights, policy=policy)
        self.reference_column, self.keywords_column, self.language_column = reference_column, keywords_column, language_column

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any],
                    completion_ids: Sequence[Sequence[int]] | None, kwargs: Mapping[str, Any]) -> list[Outcome]:
        n = len(completions)
        references = column(kwargs, self.reference_column, n, self.__name__, required=True)
        keywords = column(kwargs, self.keywords_column, n, self.__name__, required=False)
        languages = column(kwargs, self.language_column, n, self.__name__, required=False)
        assert references is not None
        return await self.scorer.score(
            [completion_text(c) for c in completions], [None if r is None else str(r) for r in references],
            keywords=None if keywords is None else [_keywords(k) for k in keywords],
            languages=None if languages is None else [str(lang or "") for lang in languages])


class RuleReward(_Rules, _SyncCall):
    """The ASR paper's rule rewards of text completions against a reference column (rule-reward service).

    reward = accuracy * R1 + hallucination * R2 + keyword * R3 under `weights` (server default 1, 1, 0);
    logged components `<name>/wer`, `/accuracy`, `/hallucination`, `/keyword` when TRL passes `log_extra`.

    Args:
        endpoints: "host:port" (or several, comma-separated) of the rule-reward service; the local default if None.
        reference_column: dataset column with the reference transcript.
        keywords_column: optional column with a list of keywords per row (for R3).
        language_column: optional column with an ISO 639-1 code per row ("" is en).
        weights: RuleWeights(accuracy, hallucination, keyword).
        policy: deadline, retries and the failure reward (None).
        name: what TRL logs it as.
    """


class AsyncRuleReward(_Rules, _AsyncCall):
    """`RuleReward` with `async def __call__`, awaited on TRL's event loop."""


class _Speech(TrlReward):
    """Where a completion's audio comes from: an audio column, a to_audio callable, or speech tokens + token2wav."""

    def __init__(self, name: str, policy: CallPolicy, log_components: bool, audio_column: str | None,
                 to_audio: ToAudio | None, token2wav: Token2Wav | None):
        super().__init__(name, policy, log_components)
        given = [x is not None for x in (audio_column, to_audio, token2wav)]
        if sum(given) != 1:
            raise ValueError(f"{name}: give exactly one audio source: audio_column (the dataset holds each sample's "
                             "audio), to_audio (a callable making audio from completions) or token2wav (speech "
                             "tokens <|s_N|> in the completion text -> audio)")
        self.audio_column, self.to_audio, self.token2wav = audio_column, to_audio, token2wav

    async def audios(self, prompts: Sequence[Any], completions: Sequence[Any],
                     completion_ids: Sequence[Sequence[int]] | None,
                     kwargs: Mapping[str, Any]) -> tuple[list[AudioLike | None], dict[int, str]]:
        n = len(completions)
        if self.audio_column is not None:
            cells = column(kwargs, self.audio_column, n, self.__name__, required=True)
            assert cells is not None
            return [as_audio(c) for c in cells], {}
        if self.to_audio is not None:
            return await self._call_to_audio(prompts, completions, completion_ids, kwargs)
        tokens = [parse_speech_tokens(completion_text(c)) for c in completions]
        return await speech_from_tokens(self.token2wav, tokens, self.__name__)

    async def _call_to_audio(self, prompts: Sequence[Any], completions: Sequence[Any],
                             completion_ids: Sequence[Sequence[int]] | None,
                             kwargs: Mapping[str, Any]) -> tuple[list[AudioLike | None], dict[int, str]]:
        assert self.to_audio is not None
        call = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs}
        try:
            if is_async_callable(self.to_audio):
                made = await self.to_audio(**call)  # type: ignore[misc]
            else:
                made = await asyncio.to_thread(lambda: self.to_audio(**call))  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the user's vocoder failing costs this call's items, not the step
            reason = f"to_audio failed: {type(exc).__name__}: {exc}"
            return [None] * len(completions), {i: reason for i in range(len(completions))}
        made = list(made)
        if len(made) != len(completions):
            raise ValueError(f"{self.__name__}: to_audio returned {len(made)} audios for {len(completions)} completions")
        return [as_audio(a) for a in made], {}


class _Intelligibility(_Speech):
    def __init__(self, endpoints: str | None = None, *, reference_column: str = "reference",
                 language_column: str | None = "language", audio_column: str | None = None,
                 to_audio: ToAudio | None = None, token2wav: Token2Wav | None = None,
                 reward_mapping: str | None = "one_minus_tanh_3wer", error_unit: str | None = None,
                 policy: CallPolicy = CallPolicy(), name: str = "intelligibility", log_components: bool = True):
        super().__init__(name, policy, log_components, audio_column, to_audio, token2wav)
        self.scorer = IntelligibilityScorer(endpoints, reward_mapping=reward_mapping, error_unit=error_unit,
                                            policy=policy)
        self.reference_column, self.language_column = reference_column, language_column

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any],
                    completion_ids: Sequence[Sequence[int]] | None, kwargs: Mapping[str, Any]) -> list[Outcome]:
        n = len(completions)
        references = column(kwargs, self.reference_column, n, self.__name__, required=True)
        languages = column(kwargs, self.language_column, n, self.__name__, required=False)
        assert references is not None
        audios, errors = await self.audios(prompts, completions, completion_ids, kwargs)
        return await self.scorer.score(audios, [None if r is None else str(r) for r in references],
                                       languages=None if languages is None else [str(x or "") for x in languages],
                                       local_errors=errors)


class IntelligibilityReward(_Intelligibility, _SyncCall):
    """How well an ASR model understands the generated speech (TTS): a WER reward per completion.

    The audio of each completion comes from exactly one of `audio_column`, `to_audio` or
    `token2wav` (speech tokens `<|s_N|>` parsed from the completion text, CosyVoice style).
    reward_mapping: "one_minus_tanh_3wer" (CosyVoice's GRPO recipe, the default), "one_minus_wer",
    "negative_wer" or None for the scorer's default. error_unit: what the mapped error rate counts,
    "word" (None), "character" or "pinyin" (Mandarin, CosyVoice2's recipe). Logged components: wer, cer,
    error_rate, transcript.
    """


class AsyncIntelligibilityReward(_Intelligibility, _AsyncCall):
    """`IntelligibilityReward` with `async def __call__`."""


class _SpeakerSimilarity(_Speech):
    def __init__(self, endpoints: str | None = None, *, reference_audio_column: str = "reference_audio",
                 audio_column: str | None = None, to_audio: ToAudio | None = None, token2wav: Token2Wav | None = None,
                 reward_mapping: str | None = None, policy: CallPolicy = CallPolicy(),
                 name: str = "speaker_similarity", log_components: bool = True):
        super().__init__(name, policy, log_components, audio_column, to_audio, token2wav)
        self.scorer = SpeakerScorer(endpoints, reward_mapping=reward_mapping, policy=policy)
        self.reference_audio_column = reference_audio_column

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any],
                    completion_ids: Sequence[Sequence[int]] | None, kwargs: Mapping[str, Any]) -> list[Outcome]:
        references = column(kwargs, self.reference_audio_column, len(completions), self.__name__, required=True)
        assert references is not None
        audios, errors = await self.audios(prompts, completions, completion_ids, kwargs)
        return await self.scorer.score(audios, [as_speaker_reference(r) for r in references], local_errors=errors)


class SpeakerSimilarityReward(_SpeakerSimilarity, _SyncCall):
    """How close the generated voice is to the row's reference voice (TTS), by the speaker scorer.

    reference_audio_column holds a path, WAV bytes, (samples, rate), a datasets Audio dict, an
    embedding (1-D array) or a `SpeakerId` per row. reward_mapping: "cosine" (raw, [-1, 1]),
    "shifted" ((cos + 1) / 2) or "clipped"; None is the scorer's default. Logged component: cosine.
    """


class AsyncSpeakerSimilarityReward(_SpeakerSimilarity, _AsyncCall):
    """`SpeakerSimilarityReward` with `async def __call__`."""
