"""Reward functions for verl, in the shapes its reward managers call.

- `async def compute_score_async(data_source, solution_str, ground_truth, extra_info=None, **kwargs)`: one
  sample, awaited; for verl 0.9's default `naive` reward manager, which awaits coroutine functions on
  its reward-loop worker's event loop, all samples concurrently (use this one: the scorers batch the
  concurrent calls on the GPU).
- `compute_score(...)`: the same arguments, blocking; for the `remote` manager, which runs it in Ray
  actor processes and refuses coroutine functions (it also works under `naive`, in a thread pool).
- `compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs) -> list`: one
  scorer call for the whole batch; only verl 0.7.0's `batch` manager calls this shape (verl 0.9's
  reward-loop registry has naive, remote, rate_limited, dapo and gdpo).

Point verl 0.9 at them with `reward.custom_reward_function.path=pkg://speechrl.adapters.verl` and
`reward.custom_reward_function.name=compute_score_async` (keys of verl/trainer/config/reward/reward.yaml;
the manager is `reward.reward_manager.name`, default naive). Settings go in
`+reward.custom_reward_function.reward_kwargs.<name>` and reach every call as keyword arguments (see
`VerlRewardConfig` for each one). The top-level `custom_reward_function.*` of verl <= 0.8 is ignored
by verl 0.9; docs/integrations/verl.md has the keys of each version.

What is scored, per sample:
- ASR (`task="asr"`): the decoded response is the hypothesis, ground_truth the reference text (or a
  dict {"reference", "keywords", "language"}); the rule-reward service gives
  score = accuracy * R1 + hallucination * R2 + keyword * R3.
- TTS (`task="tts"`): speech tokens written `<|s_N|>` in the response (CosyVoice's GRPO recipe)
  become audio through `token2wav` (a callable, or "package.module:function", e.g. one calling
  SpeechRL's token2wav service with Token2WavClient; without one the call raises Token2WavNotConfigured),
  then score = the intelligibility reward (default 1 - tanh(3 WER), the recipe's) plus
  `speaker_weight` * the speaker similarity to `reference_audio` (from ground_truth or extra_info).
- `task="auto"` (the default) picks TTS for responses that contain speech tokens.

The result is a dict (verl logs every key): "score", "scored" (False when the sample could not be
scored), "error" (why, else ""), and the components (0.0 when not scored); the keys are the same
for every sample, as verl's reward loop requires. `return_dict=False` gives the bare float. A
sample that cannot be scored gets `failure_score` (0.0, as verl's own rate-limited manager gives
on a timeout) and its reason is logged on the "speechrl.adapters" logger; every scorer call has a
deadline (`timeout_s`, retries included), so a step never hangs on a dead scorer.

>>> config = VerlRewardConfig.from_kwargs({"timeout_s": "5", "rules_endpoints": ["a:1", "b:2"], "reward_router_address": None})
>>> config.timeout_s, config.rules_endpoints
(5.0, 'a:1,b:2')
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from speechrl.adapters.inputs import SPEECH_TOKEN, as_speaker_reference, parse_speech_tokens
from speechrl.adapters.scoring import (
    CallPolicy,
    IntelligibilityScorer,
    Outcome,
    RulesScorer,
    RuleWeights,
    SpeakerScorer,
    failed,
    log_failures,
    run_sync,
)
from speechrl.adapters.token2wav import Token2Wav, load_callable, speech_from_tokens
from speechrl.client import RetryPolicy

log = logging.getLogger("speechrl.adapters")

# Keyword arguments verl itself adds to compute_score calls; they are not settings of ours.
VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer", "sandbox_fusion_url",
                         "concurrent_semaphore", "memory_limit_mb"})

_WARNED: set[tuple[str, ...]] = set()

ASR_KEYS = ("wer", "accuracy", "hallucination", "keyword")
TTS_KEYS = ("wer", "cer", "intelligibility", "similarity")


@dataclass(frozen=True)
class VerlRewardConfig:
    """Settings of the verl reward functions, given as verl 0.9's `reward.custom_reward_function.reward_kwargs`."""

    task: str = "auto"
    """"asr" (rule rewards of text), "tts" (speech tokens -> audio -> intelligibility), or "auto" (by the response)."""
    rules_endpoints: str | None = None
    """Rule-reward service, "host:port[,host:port]"; None is 127.0.0.1:50053."""
    intelligibility_endpoints: str | None = None
    """Intelligibility scorer; None is 127.0.0.1:50051."""
    speaker_endpoints: str | None = None
    """Speaker-similarity scorer; None is 127.0.0.1:50052."""
    timeout_s: float = 30.0
    """Deadline of one scorer call, retries included."""
    max_attempts: int = 3
    """Attempts per call on UNAVAILABLE / RESOURCE_EXHAUSTED (1 turns retries off)."""
    failure_score: float = 0.0
    """Score of a sample that could not be scored (verl needs a number)."""
    raise_on_service_error: bool = False
    """True: a scorer that is down or past its deadline raises instead of giving failure_score."""
    return_dict: bool = True
    """True: {"score", "scored", "error", components...}; False: the bare float."""
    accuracy_weight: float | None = None
    """ASR: weight of R1 (1 - WER); None is the service default (1)."""
    hallucination_weight: float | None = None
    """ASR: weight of R2 (-1 on a hallucination); None is the service default (1)."""
    keyword_weight: float | None = None
    """ASR: weight of R3 (keyword precision/recall); None is the service default (0)."""
    wer_reward_mapping: str = "one_minus_tanh_3wer"
    """TTS: WER -> reward: one_minus_tanh_3wer (CosyVoice's recipe), one_minus_wer or negative_wer."""
    speaker_weight: float = 0.0
    """TTS: weight of the speaker-similarity reward added to the score; 0 skips the speaker scorer."""
    similarity_mapping: str | None = None
    """TTS: cosine -> reward: cosine, shifted or clipped; None is the scorer's default."""
    token2wav: Any = None
    """TTS: speech tokens -> audio, a callable or "package.module:function" (list[list[int]] -> audios)."""
    language: str = ""
    """ISO 639-1 code when neither ground_truth nor extra_info gives one ("" is en)."""

    def __post_init__(self) -> None:
        if self.task not in ("asr", "tts", "auto"):
            raise ValueError(f"task must be asr, tts or auto, got {self.task!r}")
        if self.speaker_weight < 0:
            raise ValueError(f"speaker_weight must be >= 0, got {self.speaker_weight}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> VerlRewardConfig:
        """The settings among a call's keyword arguments (values from YAML may come as strings)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = tuple(sorted(set(kwargs) - set(fields) - VERL_KWARGS))
        if unknown and unknown not in _WARNED:
            _WARNED.add(unknown)  # a typo in reward_kwargs would otherwise pass unnoticed
            log.warning("ignoring unknown speechrl reward setting(s) %s; the settings are %s", list(unknown), sorted(fields))
        values: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in fields and value is not None:
                values[name] = _coerce(name, fields[name].type, value)
        return cls(**values)

    def keys(self) -> tuple[str, ...]:
        """The component keys of every result dict, the same for every sample."""
        keys = {"asr": ASR_KEYS, "tts": TTS_KEYS, "auto": tuple(dict.fromkeys(ASR_KEYS + TTS_KEYS))}[self.task]
        return keys + (("transcript",) if self.task != "asr" else ())


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    kind = str(annotation)
    if name.endswith("_endpoints") and not isinstance(value, str):
        return ",".join(str(v) for v in value)  # a YAML list of replicas (settings must stay hashable)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("int"):
        return int(value)
    if kind == "bool":
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    return value


class _Backend:
    """The scorers of one configuration, shared by every call with it."""

    def __init__(self, config: VerlRewardConfig):
        policy = CallPolicy(timeout_s=config.timeout_s, retry=RetryPolicy(max_attempts=config.max_attempts),
                            failure_reward=config.failure_score, raise_on_service_error=config.raise_on_service_error)
        self.config = config
        self.rules = RulesScorer(config.rules_endpoints, policy=policy, weights=RuleWeights(
            config.accuracy_weight, config.hallucination_weight, config.keyword_weight))
        self.intelligibility = IntelligibilityScorer(config.intelligibility_endpoints,
                                                     reward_mapping=config.wer_reward_mapping, policy=policy)
        self.speaker = SpeakerScorer(config.speaker_endpoints, reward_mapping=config.similarity_mapping, policy=policy)
        self.token2wav: Token2Wav | None = load_callable(config.token2wav)


_BACKENDS: dict[VerlRewardConfig, _Backend] = {}
_BACKENDS_LOCK = threading.Lock()


def backend(config: VerlRewardConfig) -> _Backend:
    with _BACKENDS_LOCK:
        if config not in _BACKENDS:
            _BACKENDS[config] = _Backend(config)
        return _BACKENDS[config]


@dataclass(frozen=True)
class _Sample:
    response: str
    reference: str | None
    keywords: list[str]
    language: str
    reference_audio: Any


def _sample(solution_str: Any, ground_truth: Any, extra_info: Any, config: VerlRewardConfig) -> _Sample:
    gt = ground_truth if isinstance(ground_truth, Mapping) else {"reference": ground_truth}
    extra = extra_info if isinstance(extra_info, Mapping) else {}
    reference = next((gt[k] for k in ("reference", "text", "ground_truth") if gt.get(k) is not None), None)

    def pick(key: str) -> Any:
        return gt.get(key) if gt.get(key) is not None else extra.get(key)

    keywords = pick("keywords")
    if isinstance(keywords, str):
        keywords = [keywords] if keywords else []
    return _Sample(response=str(solution_str), reference=None if reference is None else str(reference),
                   keywords=[str(k) for k in (keywords if keywords is not None else [])],
                   language=str(pick("language") or config.language), reference_audio=pick("reference_audio"))


async def _score_asr(b: _Backend, samples: Sequence[_Sample]) -> list[Outcome]:
    return await b.rules.score([s.response for s in samples], [s.reference for s in samples],
                               keywords=[s.keywords for s in samples], languages=[s.language for s in samples])


async def _score_tts(b: _Backend, samples: Sequence[_Sample]) -> list[Outcome]:
    tokens = [parse_speech_tokens(s.response) for s in samples]
    audios, errors = await speech_from_tokens(b.token2wav, tokens, "speechrl.adapters.verl")
    heard = await b.intelligibility.score(audios, [s.reference for s in samples],
                                          languages=[s.language for s in samples], local_errors=errors)
    if not b.config.speaker_weight:
        return [Outcome(o.reward, {"wer": o.components["wer"], "cer": o.components["cer"], "intelligibility": o.reward},
                        o.texts) if o.reward is not None else o for o in heard]
    refs = [as_speaker_reference(s.reference_audio) for s in samples]
    voices = await b.speaker.score(audios, refs,
                                   local_errors={i: o.error for i, o in enumerate(heard) if o.error is not None})
    out = []
    for h, v in zip(heard, voices, strict=True):
        if h.reward is None or v.reward is None:
            out.append(failed(h.error or v.error or "not scored"))
            continue
        out.append(Outcome(h.reward + b.config.speaker_weight * v.reward,
                           {"wer": h.components["wer"], "cer": h.components["cer"], "intelligibility": h.reward,
                            "similarity": v.components["cosine"]}, h.texts))
    return out


async def _score(samples: Sequence[_Sample], config: VerlRewardConfig) -> list[float | dict[str, Any]]:
    b = backend(config)
    is_tts = [config.task == "tts" or (config.task == "auto" and SPEECH_TOKEN.search(s.response) is not None)
              for s in samples]
    outcomes: list[Outcome] = [failed("not scored")] * len(samples)
    for want_tts, score in ((False, _score_asr), (True, _score_tts)):
        indices = [i for i, t in enumerate(is_tts) if t == want_tts]
        if indices:
            for i, o in zip(indices, await score(b, [samples[i] for i in indices]), strict=True):
                outcomes[i] = o
    log_failures("verl compute_score", outcomes)
    return [_result(o, config) for o in outcomes]


def _result(outcome: Outcome, config: VerlRewardConfig) -> float | dict[str, Any]:
    score = config.failure_score if outcome.reward is None else float(outcome.reward)
    if not config.return_dict:
        return score
    result: dict[str, Any] = {"score": score, "scored": outcome.reward is not None, "error": outcome.error or ""}
    for key in config.keys():
        result[key] = outcome.texts.get(key, "") if key == "transcript" else float(outcome.components.get(key, 0.0))
    return result


async def compute_score_async(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                              **kwargs: Any) -> float | dict[str, Any]:
    """One sample's score, awaited (verl 0.9's naive reward manager awaits coroutine functions)."""
    config = VerlRewardConfig.from_kwargs(kwargs)
    return (await _score([_sample(solution_str, ground_truth, extra_info, config)], config))[0]


def compute_score(data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> float | dict[str, Any]:
    """One sample's score, blocking (verl 0.9's remote reward manager): a dict with "score" and more, or a float."""
    return run_sync(compute_score_async(data_source, solution_str, ground_truth, extra_info, **kwargs))


async def compute_score_batch_async(data_sources: Sequence[Any], solution_strs: Sequence[str],
                                    ground_truths: Sequence[Any], extra_infos: Sequence[Any] | None = None,
                                    **kwargs: Any) -> list[float | dict[str, Any]]:
    """The batch form, awaited."""
    config = VerlRewardConfig.from_kwargs(kwargs)
    infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
    if not len(data_sources) == len(solution_strs) == len(ground_truths) == len(infos):
        raise ValueError(f"need one entry per sample: {len(data_sources)} data_sources, {len(solution_strs)} "
                         f"solution_strs, {len(ground_truths)} ground_truths, {len(infos)} extra_infos")
    samples = [_sample(s, g, e, config) for s, g, e in zip(solution_strs, ground_truths, infos, strict=True)]
    return await _score(samples, config)


def compute_score_batch(data_sources: Sequence[Any], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[Any] | None = None, **kwargs: Any) -> list[float | dict[str, Any]]:
    """Scores of a batch (verl 0.7.0's batch reward manager), one per sample, in order; one call per scorer."""
    return run_sync(compute_score_batch_async(data_sources, solution_strs, ground_truths, extra_infos, **kwargs))
