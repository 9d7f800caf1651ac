"""What every trainer adapter shares: the call policy, scorers bound to the running event loop,
and the helpers that turn a trainer's values (completions, dataset cells, speech tokens) into ours.

One async core: each scorer below has an `async score(...)` that returns one `Outcome` per item and
never raises for a scorer failure (unless the policy asks it to); the sync faces in `trl` and `verl`
run it on the client SDK's background loop (`run_sync`).

>>> parse_speech_tokens("<|s_12|><|s_7|> <|s_0|>")
[12, 7, 0]
>>> completion_text([{"role": "assistant", "content": "turn on the light"}])
'turn on the light'
>>> Outcome(None, error="EMPTY_TEXT: reference is empty").reward_or(0.0)
0.0
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
    AudioLike,
    ItemFailedError,
    RetryPolicy,
    ServiceError,
    SpeakerId,
)
from speechrl.client.scorers import AsyncClient
from speechrl.client.sync import _LoopThread

log = logging.getLogger("speechrl.adapters")

T = TypeVar("T")
C = TypeVar("C", bound=AsyncClient)

DEFAULT_ADAPTER_TIMEOUT_S = 30.0
"""Deadline of one scorer call from an adapter, retries and backoff included."""

SPEECH_TOKEN = re.compile(r"<\|s_(\d+)\|>")
"""A CosyVoice-style speech token in decoded text, e.g. <|s_1234|>."""


@dataclass(frozen=True)
class CallPolicy:
    """How an adapter calls a scorer and what a trainer gets when it cannot.

    A reward step must never hang: every call has a deadline (`timeout_s`, retries included), is
    retried only on UNAVAILABLE / RESOURCE_EXHAUSTED (`retry`), and a failure becomes
    `failure_reward` for the items concerned, with the reason logged at WARNING on the
    "speechrl.adapters" logger. `failure_reward=None` is TRL's "could not score" (NaN, left out of
    the group baseline); verl and OpenRLHF need a number and use 0.0.
    """

    timeout_s: float = DEFAULT_ADAPTER_TIMEOUT_S
    """Deadline of one scorer call, all attempts and backoff included."""
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(max_attempts=3))
    """Retries on UNAVAILABLE / RESOURCE_EXHAUSTED; RetryPolicy(max_attempts=1) turns them off."""
    failure_reward: float | None = None
    """The reward of an item that could not be scored (item error, scorer down, deadline passed)."""
    raise_on_service_error: bool = False
    """True: a failed call (scorer down, deadline) raises ServiceError instead of giving failure_reward."""
    token: str | None = None
    """Bearer token sent to the scorers, when they require one."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class Outcome:
    """One item's reward and its named components, or why there is none."""

    reward: float | None
    components: Mapping[str, float] = field(default_factory=dict)
    """Named parts of the reward, e.g. {"wer": 0.25, "accuracy": 0.75}; empty when the item failed."""
    texts: Mapping[str, str] = field(default_factory=dict)
    """Text by-products, e.g. {"transcript": "..."}."""
    error: str | None = None
    """Why reward is None, e.g. "EMPTY_TEXT: reference is empty (items[3].reference)"."""

    def reward_or(self, failure_reward: float | None) -> float | None:
        return failure_reward if self.reward is None else self.reward


def failed(reason: str) -> Outcome:
    return Outcome(None, error=reason)


def log_failures(name: str, outcomes: Sequence[Outcome]) -> None:
    """One WARNING line per call naming how many items failed and the first few reasons."""
    reasons = [o.error for o in outcomes if o.error is not None]
    if reasons:
        distinct = list(dict.fromkeys(reasons))
        log.warning("%s: %d of %d items not scored: %s%s", name, len(reasons), len(outcomes),
                    "; ".join(distinct[:3]), f" (+{len(distinct) - 3} more reasons)" if len(distinct) > 3 else "")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run an adapter coroutine to completion from synchronous code (the SDK's background loop)."""
    return _LoopThread.run(coroutine)


class LoopBound(Generic[C]):
    """One client per event loop: grpc.aio channels belong to the loop that created them.

    TRL runs async reward functions on its own daemon loop, verl's reward loop has one loop per
    worker, and the sync faces use the SDK's loop thread; each gets its own channels, made on first
    use. Pickling drops the clients (TRL forwards reward functions to spawned processes).
    """

    def __init__(self, factory: Callable[[], C]):
        self._factory = factory
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, C] = weakref.WeakKeyDictionary()

    def get(self) -> C:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._factory()
        return client

    async def aclose(self) -> None:
        """Close the client of the running loop (others close with their loops)."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._factory = state["_factory"]
        self._clients = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _ClientFactory(Generic[C]):
    """A picklable `() -> client` (a lambda would not pickle)."""

    client_class: type[C]
    endpoints: str | None
    policy: CallPolicy

    def __call__(self) -> C:
        return self.client_class(self.endpoints, timeout_s=self.policy.timeout_s, retry=self.policy.retry,
                                 token=self.policy.token)


class _Scorer(Generic[C]):
    """A scorer as the adapters use it: per-item Outcomes, local checks first, the policy on failures.

    With `client`, that client is used as it is (the gateway passes its own, whose deadline and
    retries come from its config); otherwise one is made per event loop from endpoints and policy.
    """

    client_class: type[C]

    def __init__(self, endpoints: str | None, policy: CallPolicy, client: C | None = None):
        self.policy = policy
        self.client = client
        self.clients: LoopBound[C] = LoopBound(_ClientFactory(self.client_class, endpoints, policy))

    async def _call(self, what: str, call: Callable[[C], Awaitable[list[T]]]) -> list[T] | str:
        """The scorer's results, or the reason the whole call failed (raised when the policy says so)."""
        try:
            return await call(self.client if self.client is not None else self.clients.get())
        except ServiceError as exc:
            if self.policy.raise_on_service_error:
                raise
            return f"{what} call failed: {exc}"

    async def aclose(self) -> None:
        await self.clients.aclose()


def _item_error(result: Any) -> str:
    error = result.error
    return f"{error.code}: {error.message}" + (f" ({error.field})" if error.field else "")


def _split_missing(audios: Sequence[Any], references: Sequence[Any], local_errors: Mapping[int, str] | None,
                   missing_reference: str) -> tuple[dict[int, str], list[int]]:
    """(errors of items that cannot be sent: given ones, no audio, no reference; indexes to send)."""
    local = dict(local_errors or {})
    for i, (audio, reference) in enumerate(zip(audios, references, strict=True)):
        if i not in local and audio is None:
            local[i] = "no audio for this item"
        elif i not in local and reference is None:
            local[i] = missing_reference
    return local, [i for i in range(len(audios)) if i not in local]


def _merge(count: int, local: dict[int, str], sent: list[int], remote: list[Outcome] | str) -> list[Outcome]:
    """Outcomes in item order from the items refused locally and the ones the scorer answered."""
    out: list[Outcome] = [failed(local[i]) if i in local else failed("not sent") for i in range(count)]
    for position, index in enumerate(sent):
        out[index] = failed(remote) if isinstance(remote, str) else remote[position]
    return out


@dataclass(frozen=True)
class RuleWeights:
    """Weights of total = accuracy * R1 + hallucination * R2 + keyword * R3; None keeps the server's (1, 1, 0)."""

    accuracy: float | None = None
    hallucination: float | None = None
    keyword: float | None = None


class RulesScorer(_Scorer[AsyncRuleRewardsClient]):
    """The rule-reward service for text hypotheses (ASR): components wer, accuracy, hallucination, keyword."""

    client_class = AsyncRuleRewardsClient

    def __init__(self, endpoints: str | None = None, *, weights: RuleWeights = RuleWeights(),
                 policy: CallPolicy = CallPolicy(), client: AsyncRuleRewardsClient | None = None):
        super().__init__(endpoints, policy, client)
        self.weights = weights

    async def score(self, hypotheses: Sequence[str], references: Sequence[str | None], *,
                    keywords: Sequence[Sequence[str]] | None = None,
                    languages: Sequence[str] | None = None) -> list[Outcome]:
        count = len(hypotheses)
        local = {i: "no reference text for this item" for i, r in enumerate(references) if r is None}
        sent = [i for i in range(count) if i not in local]
        if not sent:
            return _merge(count, local, sent, [])
        kws = [list(keywords[i]) if keywords is not None else [] for i in sent]
        langs = [languages[i] if languages is not None else "" for i in sent]

        async def call(client: AsyncRuleRewardsClient) -> list[Outcome]:
            results = await client.score([hypotheses[i] for i in sent], [str(references[i]) for i in sent],
                                         keywords=kws, language=langs, accuracy_weight=self.weights.accuracy,
                                         hallucination_weight=self.weights.hallucination,
                                         keyword_weight=self.weights.keyword)
            return [_rule_outcome(r) for r in results]

        return _merge(count, local, sent, await self._call("rules", call))


def _rule_outcome(result: Any) -> Outcome:
    if result.score is None:
        return failed(_item_error(result))
    s = result.score
    return Outcome(s.total, {"wer": s.wer, "accuracy": s.accuracy_reward, "hallucination": s.hallucination_reward,
                             "keyword": s.keyword_reward})


class IntelligibilityScorer(_Scorer[AsyncIntelligibilityClient]):
    """The intelligibility scorer for speech (TTS): components wer, cer, error_rate; text transcript.

    error_unit picks what the rewarded error rate counts (word, character, pinyin); None is words.
    """

    client_class = AsyncIntelligibilityClient

    def __init__(self, endpoints: str | None = None, *, reward_mapping: str | None = None,
                 error_unit: str | None = None, policy: CallPolicy = CallPolicy(),
                 client: AsyncIntelligibilityClient | None = None):
        super().__init__(endpoints, policy, client)
        self.reward_mapping = reward_mapping
        self.error_unit = error_unit

    async def score(self, audios: Sequence[AudioLike | None], references: Sequence[str | None], *,
                    languages: Sequence[str] | None = None, local_errors: Mapping[int, str] | None = None) -> list[Outcome]:
        count = len(audios)
        local, sent = _split_missing(audios, references, local_errors, "no reference text for this item")
        if not sent:
            return _merge(count, local, sent, [])

        async def call(client: AsyncIntelligibilityClient) -> list[Outcome]:
            results = await client.score([audios[i] for i in sent], [str(references[i]) for i in sent],  # type: ignore[misc]
                                         language=[languages[i] if languages else "" for i in sent],
                                         reward_mapping=self.reward_mapping, error_unit=self.error_unit)
            return [_intelligibility_outcome(r) for r in results]

        return _merge(count, local, sent, await self._call("intelligibility", call))


def _intelligibility_outcome(result: Any) -> Outcome:
    if result.score is None:
        return failed(_item_error(result))
    s = result.score
    return Outcome(s.reward, {"wer": s.wer, "cer": s.cer, "error_rate": s.error_rate}, {"transcript": s.transcript})


SpeakerReferenceLike = AudioLike | np.ndarray | SpeakerId


class SpeakerScorer(_Scorer[AsyncSpeakerClient]):
    """The speaker-similarity scorer: component cosine (raw, in [-1, 1])."""

    client_class = AsyncSpeakerClient

    def __init__(self, endpoints: str | None = None, *, reward_mapping: str | None = None,
                 policy: CallPolicy = CallPolicy(), client: AsyncSpeakerClient | None = None):
        super().__init__(endpoints, policy, client)
        self.reward_mapping = reward_mapping

    async def score(self, audios: Sequence[AudioLike | None], references: Sequence[SpeakerReferenceLike | None], *,
                    local_errors: Mapping[int, str] | None = None) -> list[Outcome]:
        count = len(audios)
        local, sent = _split_missing(audios, references, local_errors, "no reference voice for this item")
        if not sent:
            return _merge(count, local, sent, [])

        async def call(client: AsyncSpeakerClient) -> list[Outcome]:
            results = await client.score([audios[i] for i in sent], [references[i] for i in sent],  # type: ignore[misc]
                                         reward_mapping=self.reward_mapping)
            return [_speaker_outcome(r) for r in results]

        return _merge(count, local, sent, await self._call("speaker", call))


def _speaker_outcome(result: Any) -> Outcome:
    if result.score is None:
        return failed(_item_error(result))
    return Outcome(result.score.reward, {"cosine": result.score.cosine})


# ---- turning a trainer's values into ours ----

def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or conversational messages (the assistant's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content", ""))
    if isinstance(completion, Sequence):
        messages = [m for m in completion if isinstance(m, Mapping)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "".join(_content_text(m.get("content", "")) for m in assistant)
    raise TypeError(f"cannot read text from a completion of type {type(completion).__name__}")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # multimodal parts: [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return str(content)


def parse_speech_tokens(text: str) -> list[int]:
    """Speech token ids from decoded text, as CosyVoice's GRPO recipe writes them (<|s_N|>)."""
    return [int(n) for n in SPEECH_TOKEN.findall(text)]


def as_audio(value: Any) -> AudioLike | None:
    """Audio from a dataset cell: path, bytes, (array, rate), or a Hugging Face datasets Audio dict.

    >>> as_audio({"array": np.zeros(4), "sampling_rate": 16000})[1]
    16000
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            return (np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"]))
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(value["path"])
        raise ValueError(f"audio dict needs 'array' + 'sampling_rate', 'bytes' or 'path'; got keys {sorted(value)}")
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return (np.asarray(value[0], dtype=np.float32), value[1])
    return value  # type: ignore[no-any-return]


def as_speaker_reference(value: Any) -> SpeakerReferenceLike | None:
    """A reference voice from a dataset cell: audio (see as_audio), an embedding, or a SpeakerId."""
    if isinstance(value, (np.ndarray, SpeakerId)):
        return value
    return as_audio(value)


# ---- speech tokens -> audio (the token2wav step, a pluggable callable) ----

Token2WavOutput = AudioLike | Exception | None
Token2Wav = Callable[[list[list[int]]], Sequence[Token2WavOutput] | Awaitable[Sequence[Token2WavOutput]]]
"""Turns speech-token sequences into audio, one per sequence, sync or async; where it could not, None
or the exception that says why (e.g. the token2wav service's per-item error)."""


class Token2WavNotConfigured(RuntimeError):
    """Speech tokens must become audio before they can be scored, and no token2wav step was given."""

    def __init__(self, where: str):
        super().__init__(
            f"token2wav backend not configured: {where} got speech tokens (<|s_N|>) but has no token2wav callable "
            "to turn them into audio. Pass token2wav=<callable taking list[list[int]] and returning one audio "
            "(path, WAV bytes or (samples, rate)) per sequence>, e.g. your CosyVoice flow + HiFT decoder, or "
            "SpeechRL's token2wav service (`speechrl serve token2wav`; the gateway's `token2wav` setting).")


def is_async_callable(fn: Any) -> bool:
    """Whether calling fn gives a coroutine: async functions, partials of them, objects with async __call__."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def load_callable(spec: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    """A callable given itself or as "package.module:function" (what a YAML config can hold)."""
    if spec is None or callable(spec):
        return spec
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"give a callable as 'package.module:function', got {spec!r}")
    target = getattr(importlib.import_module(module), name)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


def token2wav_service(client: AsyncToken2WavClient,
                      prompt_audio: Callable[[int], Sequence[AudioLike]] | None = None) -> Token2Wav:
    """A token2wav hook backed by the token2wav service: one Synthesize call per batch, each item with
    a prompt speaker from prompt_audio(count) when given (CosyVoice2 needs one; espeak ignores it).

    An item the service could not render comes back as the exception that says why, so the reply's
    per-item error names the service's reason (e.g. ids out of range), not just "no audio".
    """

    async def render(token_lists: list[list[int]]) -> list[Token2WavOutput]:
        prompts = None if prompt_audio is None else list(prompt_audio(len(token_lists)))
        results = await client.synthesize(token_lists, prompt_audio=prompts)
        return [r.wav if r.error is None else ItemFailedError(f"{r.error.code}: {r.error.message}") for r in results]

    return render


async def speech_from_tokens(token2wav: Token2Wav | None, token_lists: Sequence[Sequence[int]],
                             where: str, *, reraise: tuple[type[Exception], ...] = ()
                             ) -> tuple[list[AudioLike | None], dict[int, str]]:
    """Audio for each token sequence (None where empty or failed) and the reasons per failed item.

    A sync token2wav runs in a worker thread so that it does not stall the event loop. A failing
    token2wav costs its items, unless its exception is one of `reraise` (a caller whose failure
    policy answers an outage with an error, not with failure rewards).
    Raises Token2WavNotConfigured when there are tokens and no token2wav.
    """
    errors = {i: "no speech tokens (<|s_N|>) in the completion" for i, t in enumerate(token_lists) if not t}
    todo = [i for i in range(len(token_lists)) if i not in errors]
    audios: list[AudioLike | None] = [None] * len(token_lists)
    if not todo:
        return audios, errors
    if token2wav is None:
        raise Token2WavNotConfigured(where)
    batch = [list(token_lists[i]) for i in todo]
    try:
        if is_async_callable(token2wav):
            produced = await token2wav(batch)  # type: ignore[misc]
        else:
            produced = await asyncio.to_thread(token2wav, batch)
            if inspect.isawaitable(produced):
                produced = await produced
    except Exception as exc:  # a failing vocoder costs its items, never the step (unless reraise)
        if isinstance(exc, reraise):
            raise
        for i in todo:
            errors[i] = f"token2wav failed: {type(exc).__name__}: {exc}"
        return audios, errors
    produced = list(produced)  # type: ignore[arg-type]
    if len(produced) != len(todo):
        for i in todo:
            errors[i] = f"token2wav returned {len(produced)} audios for {len(todo)} token sequences"
        return audios, errors
    for i, audio in zip(todo, produced, strict=True):
        if isinstance(audio, Exception):
            errors[i] = f"token2wav failed: {audio}"
            continue
        audios[i] = as_audio(audio)
        if audio is None:
            errors[i] = "token2wav produced no audio"
    return audios, errors

