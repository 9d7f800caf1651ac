"""The scorers as every trainer adapter calls them: a call policy, one client per event loop, and one
`Outcome` per item.

One async core: each scorer's `async score(...)` returns one `Outcome` per item and never raises for
a scorer failure (unless the policy asks it to); the sync faces in `trl` and `verl` run it on the
client SDK's background loop (`run_sync`). The gateway scores through the same classes.

>>> Outcome(None, error="EMPTY_TEXT: reference is empty").reward_or(0.0)
0.0
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from speechrl.adapters.inputs import SpeakerReferenceLike
from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AudioLike,
    RetryPolicy,
    ServiceError,
)
from speechrl.client.scorers import AsyncClient
from speechrl.client.sync import _LoopThread

log = logging.getLogger("speechrl.adapters")

T = TypeVar("T")
C = TypeVar("C", bound=AsyncClient)

DEFAULT_ADAPTER_TIMEOUT_S = 30.0
"""Deadline of one scorer call from an adapter, retries and backoff included."""


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

    async def _outcomes(self, what: str, call: Callable[[C], Awaitable[list[Outcome]]], count: int,
                        local: dict[int, str], sent: list[int]) -> list[Outcome]:
        """Outcomes in item order: the items refused locally, and the `sent` ones through one call."""
        return _merge(count, local, sent, await self._call(what, call) if sent else [])

    async def aclose(self) -> None:
        await self.clients.aclose()


def _outcome(result: Any, from_score: Callable[[Any], Outcome]) -> Outcome:
    """One item's Outcome: from its score, or failed with the scorer's error for the item."""
    if result.score is not None:
        return from_score(result.score)
    error = result.error
    return failed(f"{error.code}: {error.message}" + (f" ({error.field})" if error.field else ""))


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
        kws = [list(keywords[i]) if keywords is not None else [] for i in sent]
        langs = [languages[i] if languages is not None else "" for i in sent]

        async def call(client: AsyncRuleRewardsClient) -> list[Outcome]:
            results = await client.score([hypotheses[i] for i in sent], [str(references[i]) for i in sent],
                                         keywords=kws, language=langs, accuracy_weight=self.weights.accuracy,
                                         hallucination_weight=self.weights.hallucination,
                                         keyword_weight=self.weights.keyword)
            return [_outcome(r, _rule_outcome) for r in results]

        return await self._outcomes("rules", call, count, local, sent)


def _rule_outcome(s: Any) -> Outcome:
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

        async def call(client: AsyncIntelligibilityClient) -> list[Outcome]:
            results = await client.score([audios[i] for i in sent], [str(references[i]) for i in sent],  # type: ignore[misc]
                                         language=[languages[i] if languages else "" for i in sent],
                                         reward_mapping=self.reward_mapping, error_unit=self.error_unit)
            return [_outcome(r, _intelligibility_outcome) for r in results]

        return await self._outcomes("intelligibility", call, count, local, sent)


def _intelligibility_outcome(s: Any) -> Outcome:
    return Outcome(s.reward, {"wer": s.wer, "cer": s.cer, "error_rate": s.error_rate}, {"transcript": s.transcript})


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

        async def call(client: AsyncSpeakerClient) -> list[Outcome]:
            results = await client.score([audios[i] for i in sent], [references[i] for i in sent],  # type: ignore[misc]
                                         reward_mapping=self.reward_mapping)
            return [_outcome(r, _speaker_outcome) for r in results]

        return await self._outcomes("speaker", call, count, local, sent)


def _speaker_outcome(s: Any) -> Outcome:
    return Outcome(s.reward, {"cosine": s.cosine})


