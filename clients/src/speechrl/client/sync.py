"""Blocking clients, made from the asyncio ones by one mechanism: a background event-loop thread.

Each sync client owns an async client whose channels live on a shared daemon thread running an
event loop; `syncify(AsyncX.method)` makes a blocking method that submits the coroutine to that
loop and waits for its result. The logic exists once, in the async clients; here there is only
one line per method. Calls from several threads are safe (they are serialised onto one loop,
which is where gRPC does its I/O anyway).

The sync clients may be used from inside a running event loop (e.g. a callback in an async
trainer), but that blocks the loop for the call's duration; use the async client there.

>>> client = RuleRewardsClient("127.0.0.1:50053", timeout_s=5)  # no connection is made yet
>>> client.endpoints
('127.0.0.1:50053',)
>>> client.close()
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, Unpack

from speechrl.client._channel import ClientOptions, Endpoints
from speechrl.client.scorers import (
    AsyncAudioEncoderClient,
    AsyncClient,
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
)

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A", bound=AsyncClient)


class _LoopThread:
    """One event loop on a daemon thread, shared by every sync client of the process."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @classmethod
    def loop(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._thread is None or not cls._thread.is_alive():
                cls._loop = asyncio.new_event_loop()
                cls._thread = threading.Thread(target=cls._loop.run_forever, name="speechrl-client-loop", daemon=True)
                cls._thread.start()
            return cls._loop

    @classmethod
    def run(cls, coroutine: Coroutine[Any, Any, R]) -> R:
        """Run coroutine on the loop thread and block until it is done."""
        if threading.current_thread() is cls._thread:
            coroutine.close()
            raise RuntimeError("a sync SpeechRL client was called from its own loop thread; use the async client")
        future = asyncio.run_coroutine_threadsafe(coroutine, cls.loop())
        try:
            return future.result()  # the call's own deadline bounds the wait
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave the call running
            raise


def syncify(method: Callable[Concatenate[A, P], Awaitable[R]]) -> Callable[Concatenate[Any, P], R]:
    """A blocking method that runs the async client's method of the same name on the loop thread.

    Looked up by name at call time, so a subclass's override is the one that runs.
    """
    name = method.__name__

    @functools.wraps(method)
    def blocking(self: SyncClient[Any], *args: P.args, **kwargs: P.kwargs) -> R:
        return _LoopThread.run(getattr(self.async_client, name)(*args, **kwargs))

    return blocking


class SyncClient(Generic[A]):
    """Blocking face of an async client; same constructor arguments, same methods without `await`."""

    async_class: type[A]

    def __init__(self, endpoints: Endpoints | None = None, **options: Unpack[ClientOptions]):
        self.async_client: A = self.async_class(endpoints, **options)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.async_client.endpoints

    wait_until_ready = syncify(AsyncClient.wait_until_ready)
    health = syncify(AsyncClient.health)
    get_service_status = syncify(AsyncClient.get_service_status)

    def close(self) -> None:
        """Close the channels (a no-op when no call was made)."""
        if self.async_client.connection.has_channels:
            _LoopThread.run(self.async_client.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IntelligibilityClient(SyncClient[AsyncIntelligibilityClient]):
    """Blocking client of the intelligibility scorer; see AsyncIntelligibilityClient."""

    async_class = AsyncIntelligibilityClient
    score = syncify(AsyncIntelligibilityClient.score)


class SpeakerClient(SyncClient[AsyncSpeakerClient]):
    """Blocking client of the speaker-similarity scorer; see AsyncSpeakerClient."""

    async_class = AsyncSpeakerClient
    score = syncify(AsyncSpeakerClient.score)
    embed = syncify(AsyncSpeakerClient.embed)
    register = syncify(AsyncSpeakerClient.register)


class RuleRewardsClient(SyncClient[AsyncRuleRewardsClient]):
    """Blocking client of the rule-reward service; see AsyncRuleRewardsClient.

    Calls from several threads at once are merged into one request as the async client's are
    (they meet on the loop thread); `coalesce=False` sends one request per call.
    """

    async_class = AsyncRuleRewardsClient

    def __init__(self, endpoints: Endpoints | None = None, *, coalesce: bool = True, **options: Unpack[ClientOptions]):
        self.async_client = AsyncRuleRewardsClient(endpoints, coalesce=coalesce, **options)

    score = syncify(AsyncRuleRewardsClient.score)


class AudioEncoderClient(SyncClient[AsyncAudioEncoderClient]):
    """Blocking client of the audio encoder; see AsyncAudioEncoderClient."""

    async_class = AsyncAudioEncoderClient
    encode = syncify(AsyncAudioEncoderClient.encode)


class RolloutClient(SyncClient[AsyncRolloutClient]):
    """Blocking client of the rollout generator; see AsyncRolloutClient."""

    async_class = AsyncRolloutClient
    generate = syncify(AsyncRolloutClient.generate)
    update_weights = syncify(AsyncRolloutClient.update_weights)


class Token2WavClient(SyncClient[AsyncToken2WavClient]):
    """Blocking client of the token2wav service; see AsyncToken2WavClient."""

    async_class = AsyncToken2WavClient
    synthesize = syncify(AsyncToken2WavClient.synthesize)
    score_tokens = syncify(AsyncToken2WavClient.score_tokens)
