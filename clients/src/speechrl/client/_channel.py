"""Endpoints, deadlines, retries and metadata: the one place a client call meets the network.

A `Connection` holds one grpc.aio channel per endpoint ("host:port") and runs every call as
attempts under one overall deadline. Attempt k of a call goes to the endpoint after attempt
k-1's, so a dead endpoint costs one attempt and the retry lands on a live one; calls also start
on successive endpoints (round-robin) to spread load over replicas.

Only UNAVAILABLE (no connection, server draining) and RESOURCE_EXHAUSTED (a scorer shedding load)
are retried: both mean the server did not do the work. Every other status is the answer.

>>> policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, jitter=0.0)
>>> [policy.delay_s(retry) for retry in range(4)]
[0.1, 0.2, 0.4, 0.8]
>>> policy.delay_s(0, hint_s=0.5)  # a server's retry-after-ms hint wins over a shorter backoff
0.5
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("speechrl.client")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0
"""Default deadline of one call, retries and backoff included. A batch of 64 ten-second clips
through Whisper tiny on a laptop CPU takes ~10 s; raise it for larger models or batches."""

DEFAULT_MAX_MESSAGE_MB = 64
"""Largest message either way, MiB; matches the servers' default (gRPC's own is 4 MiB)."""

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("speechrl_request_id", default=None)
"""The id of the request being served; when set, every call sends it as `x-request-id` metadata so
that the server's logs of the call carry the same id (the gateway sets it per HTTP request)."""

CALLER_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("speechrl_caller_deadline", default=None)
"""time.monotonic() by which the caller being served needs its answer; when set, every call ends by
then, whatever its own timeout (the gateway sets it from a request's `X-Request-Timeout`), so a
scorer is never asked for work whose caller has gone."""

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

TRACING_SWITCH = "SPEECHRL_TRACING"
"""Set to 1 (true, yes, on), and with opentelemetry installed, every call is a client span whose W3C
`traceparent` goes with it as metadata, so the server's span joins the caller's trace (the services'
side: speechrl.services.tracing). Unset, opentelemetry is never imported here."""

# gRPC also reports an oversized message as RESOURCE_EXHAUSTED; resending it cannot help.
_MESSAGE_TOO_LARGE = ("larger than max", "message too large")

Endpoints = str | Sequence[str]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a call again.

    The n-th retry waits `min(max_backoff_s, initial_backoff_s * multiplier**n)`, scaled by a
    random factor in [1 - jitter, 1 + jitter] so that many trainers retrying at once spread out,
    and never less than the server's `retry-after-ms` hint.
    """

    max_attempts: int = 4
    """Attempts per call, the first included; 1 turns retries off."""
    initial_backoff_s: float = 0.1
    """Wait before the first retry."""
    max_backoff_s: float = 5.0
    """Longest wait between two attempts."""
    multiplier: float = 2.0
    """Growth of the wait from one retry to the next."""
    jitter: float = 0.2
    """Relative spread of each wait, in [0, 1)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (1 turns retries off), got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"need 0 <= initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s}, {self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def should_retry(self, code: grpc.StatusCode, details: str = "") -> bool:
        """Whether a failed attempt with this status may be tried again.

        >>> RetryPolicy().should_retry(grpc.StatusCode.UNAVAILABLE)
        True
        >>> RetryPolicy().should_retry(grpc.StatusCode.INVALID_ARGUMENT)
        False
        """
        if code not in RETRYABLE_CODES:
            return False
        return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(s in details.lower() for s in _MESSAGE_TOO_LARGE))

    def delay_s(self, retry: int, hint_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        if self.jitter:
            base *= (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return max(base, hint_s or 0.0)


class ServiceError(Exception):
    """A whole call failed: the gRPC status of its last attempt, after any retries.

    Per-item problems never raise this; they come back as `ItemError` in the item's result.
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, endpoint: str = "", attempts: int = 1,
                 retry_after_s: float | None = None, metadata: dict[str, str] | None = None):
        super().__init__(f"{code.name}: {details}" + (f" [{endpoint}, attempt {attempts}]" if endpoint else ""))
        self.code = code
        self.details = details
        self.endpoint = endpoint
        self.attempts = attempts
        self.retry_after_s = retry_after_s
        """The server's retry-after hint, in seconds, when it sent one (RESOURCE_EXHAUSTED)."""
        self.metadata = dict(metadata or {})
        """The call's `speechrl-*` trailing metadata, e.g. `speechrl-error-code: STALE_FENCE`."""

    @property
    def error_code(self) -> str:
        """The server's own name for the failure (trailing `speechrl-error-code`), "" when it sent none."""
        return self.metadata.get("speechrl-error-code", "")


class StaleFenceError(ServiceError):
    """The rollout service refused weights pushed under an older GPU-lease grant than the last it
    accepted (FAILED_PRECONDITION, error code STALE_FENCE): the pusher's lease lapsed and someone
    newer has pushed since. Do not retry; the pusher is no longer the holder."""

    @property
    def fence(self) -> int:
        """The fencing token the refused push carried."""
        return int(self.metadata.get("speechrl-fence", 0))

    @property
    def accepted_fence(self) -> int:
        """The fencing token of the last push the service accepted."""
        return int(self.metadata.get("speechrl-accepted-fence", 0))


def retry_after_hint(error: grpc.aio.AioRpcError) -> float | None:
    """The `retry-after-ms` trailing metadata of a failed call, in seconds, if the server sent one."""
    # grpc.aio.Metadata iterates as (key, value) pairs; the type stubs say otherwise.
    for key, value in cast(Any, error.trailing_metadata() or ()):
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value if isinstance(value, str) else value.decode()) / 1000.0)
            except ValueError:
                return None
    return None


def speechrl_metadata(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The `speechrl-*` trailing metadata of a failed call."""
    return {key: value if isinstance(value, str) else value.decode()
            for key, value in cast(Any, error.trailing_metadata() or ()) if key.startswith("speechrl-")}


def channel_options(max_message_mb: int = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, int | str]]:
    """Options of every client channel."""
    max_bytes = max_message_mb * 1024 * 1024
    return [
        # Batches of audio and encoder embeddings outgrow gRPC's 4 MiB default.
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # Trainers hold channels for hours; ping so a dead peer is seen in ~40 s. The servers permit
        # pings every 10 s without calls (speechrl.services.server.grpc_options).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # A restarted scorer is reconnected within 5 s instead of gRPC's default of up to 120 s.
        ("grpc.max_reconnect_backoff_ms", 5_000),
        # A name that resolves to several addresses (a Kubernetes headless Service: one per ready
        # pod) gets calls spread over all of them; gRPC's default, pick_first, sends every call
        # to one. The same as pick_first for a name with one address.
        ("grpc.lb_policy_name", "round_robin"),
    ]


def _opentelemetry() -> Any:
    """opentelemetry's `trace` module when TRACING_SWITCH is on and it is installed, else None."""
    if os.environ.get(TRACING_SWITCH, "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def _client_span(stub_class: type, method: str) -> AbstractContextManager[Any]:
    """The client span of one call, all its attempts inside; nothing unless tracing is on."""
    trace = _opentelemetry()
    if trace is None:
        return nullcontext()
    # Generated stubs live in the proto package's module: speechrl.v1.x_pb2_grpc.RuleRewardsStub.
    service = f"{stub_class.__module__.rpartition('.')[0]}.{stub_class.__name__.removesuffix('Stub')}"
    return trace.get_tracer("speechrl.client").start_as_current_span(
        f"{service}/{method}", kind=trace.SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})


def parse_endpoints(endpoints: Endpoints) -> tuple[str, ...]:
    """A tuple of gRPC targets from "host:port", "a:1,b:2" or a list of either.

    >>> parse_endpoints("10.0.0.1:50051, 10.0.0.2:50051")
    ('10.0.0.1:50051', '10.0.0.2:50051')
    """
    parts = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out = tuple(p.strip() for part in parts for p in part.split(",") if p.strip())
    if not out:
        raise ValueError(f"no endpoint given in {endpoints!r}; pass 'host:port' or a list of them")
    return out


class ClientOptions(TypedDict, total=False):
    """Keyword options every client (async or sync) accepts; see `Connection`."""

    timeout_s: float
    retry: RetryPolicy
    token: str | None
    metadata: Sequence[tuple[str, str]]
    max_message_mb: int
    seed: int | None
    tls_root_cert: str | bytes | None
    tls_client_cert: str | bytes | None
    tls_client_key: str | bytes | None


def _pem(value: str | bytes | None) -> bytes | None:
    """PEM bytes given either themselves or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def tls_credentials(root_cert: str | bytes | None = None, client_cert: str | bytes | None = None,
                    client_key: str | bytes | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server: its CA (None: the system's roots), and for mutual TLS this
    client's certificate chain and key (PEM bytes or file paths)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("mutual TLS needs both tls_client_cert and tls_client_key")
    return grpc.ssl_channel_credentials(root_certificates=_pem(root_cert), private_key=_pem(client_key),
                                        certificate_chain=_pem(client_cert))


# Client settings a process may take from its environment when the code that makes the client passes
# none: a container gets its token and certificates mounted and named once, instead of every call
# site (the trainer's jobs, the gateway) growing options. An argument given in code always wins.
CLIENT_ENV = {
    "SPEECHRL_CLIENT_TOKEN": "bearer token sent on every call",
    "SPEECHRL_CLIENT_TOKEN_FILE": "file whose first token line is sent (the services' token file works)",
    "SPEECHRL_CLIENT_TLS_ROOT_CERT": "PEM CA file; set, calls use TLS",
    "SPEECHRL_CLIENT_TLS_CLIENT_CERT": "PEM certificate for servers that require mutual TLS",
    "SPEECHRL_CLIENT_TLS_CLIENT_KEY": "PEM key of SPEECHRL_CLIENT_TLS_CLIENT_CERT",
}


def first_token(text: str) -> str | None:
    """The token a client sends from a token file: its first line that is not blank or a # comment.

    The services accept every line, so a file listing the new token first and the old one after
    rotates without a refusal.

    >>> first_token("# rotated 2025-06\\nnew-token\\nold-token\\n")
    'new-token'
    """
    return next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")),
                None)


def env_token(environ: Mapping[str, str] | None = None) -> str | None:
    """SPEECHRL_CLIENT_TOKEN, else the first token of SPEECHRL_CLIENT_TOKEN_FILE, else None."""
    env = os.environ if environ is None else environ
    if env.get("SPEECHRL_CLIENT_TOKEN"):
        return env["SPEECHRL_CLIENT_TOKEN"]
    path = env.get("SPEECHRL_CLIENT_TOKEN_FILE")
    if not path:
        return None
    token = first_token(Path(path).read_text())
    if token is None:  # fail loudly: a silently token-less client only meets UNAUTHENTICATED later
        raise ValueError(f"SPEECHRL_CLIENT_TOKEN_FILE={path} holds no token")
    return token


def env_tls(environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None, str | None]:
    """(root cert, client cert, client key) file paths from SPEECHRL_CLIENT_TLS_*; None where unset."""
    env = os.environ if environ is None else environ
    return tuple(env.get(f"SPEECHRL_CLIENT_TLS_{name}") or None  # type: ignore[return-value]
                 for name in ("ROOT_CERT", "CLIENT_CERT", "CLIENT_KEY"))


class Connection:
    """Channels to the endpoints of one service, and the retry loop every call runs in.

    Args:
        endpoints: "host:port", a comma-separated list, or a sequence of them.
        timeout_s: default deadline of a call, all attempts and waits included.
        retry: when to retry; `RetryPolicy()` unless given.
        token: sent as `authorization: Bearer <token>` on every call when set.
        metadata: further (key, value) pairs sent on every call.
        max_message_mb: largest message either way.
        seed: seeds the jitter, for reproducible tests.
        tls_root_cert: connect with TLS, trusting this CA certificate (PEM bytes or a file path).
        tls_client_cert, tls_client_key: this client's certificate and key, for servers that
            require mutual TLS (PEM bytes or file paths); setting them also turns TLS on.

    A token or TLS setting not given here comes from the environment (CLIENT_ENV), so a deployed
    process is configured by its mounted files; with neither, calls are plaintext and token-less.

    Channels are created on first use, inside the event loop that uses them (grpc.aio channels
    belong to one loop).
    """

    def __init__(self, endpoints: Endpoints, *, timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 token: str | None = None, metadata: Sequence[tuple[str, str]] = (),
                 max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, seed: int | None = None,
                 tls_root_cert: str | bytes | None = None, tls_client_cert: str | bytes | None = None,
                 tls_client_key: str | bytes | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.endpoints = parse_endpoints(endpoints)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.metadata: tuple[tuple[str, str], ...] = tuple(metadata)
        if token is None:
            token = env_token()
        if tls_root_cert is None and tls_client_cert is None and tls_client_key is None:
            tls_root_cert, tls_client_cert, tls_client_key = env_tls()
        if token:
            self.metadata += (("authorization", f"Bearer {token}"),)
        self._options = channel_options(max_message_mb)
        self._credentials = (tls_credentials(tls_root_cert, tls_client_cert, tls_client_key)
                             if tls_root_cert is not None or tls_client_cert is not None else None)
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[type, int], Any] = {}
        self._next = 0
        self._rng = random.Random(seed)

    @property
    def has_channels(self) -> bool:
        """Whether any channel was opened (channels open on the first call)."""
        return bool(self._channels)

    def stub(self, stub_class: type[T], index: int) -> T:
        """The stub of stub_class on the channel to endpoint `index`."""
        key = (stub_class, index)
        if key not in self._stubs:
            if index not in self._channels:
                target = self.endpoints[index]
                self._channels[index] = (
                    grpc.aio.secure_channel(target, self._credentials, options=self._options)
                    if self._credentials is not None else grpc.aio.insecure_channel(target, options=self._options))
            self._stubs[key] = stub_class(self._channels[index])  # type: ignore[call-arg]
        return self._stubs[key]

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of one call: the connection's, plus `x-request-id` when REQUEST_ID is set, plus the
        current span's `traceparent` when tracing is on."""
        request_id = REQUEST_ID.get()
        metadata = self.metadata + (("x-request-id", request_id),) if request_id else self.metadata
        if _opentelemetry() is not None:
            from opentelemetry import propagate

            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # OTEL_PROPAGATORS: W3C tracecontext and baggage unless set
            metadata += tuple(carrier.items())
        return metadata

    async def call(self, attempt: Callable[[int, float], Awaitable[T]], timeout_s: float | None = None,
                   what: str = "call") -> T:
        """Run `attempt(endpoint_index, seconds_left)` until it succeeds, fails for good or time runs out.

        Raises ServiceError with the status of the last attempt.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        caller_deadline = CALLER_DEADLINE.get()
        if caller_deadline is not None and caller_deadline < deadline:
            deadline, timeout_s = caller_deadline, max(caller_deadline - time.monotonic(), 0.0)
            if timeout_s <= 0:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: the caller's deadline passed before the call",
                                   endpoint=self.endpoints[self._next], attempts=0)
        first = self._next
        self._next = (self._next + 1) % len(self.endpoints)
        attempts = 0
        while True:
            index = (first + attempts) % len(self.endpoints)
            attempts += 1
            try:
                return await attempt(index, max(deadline - time.monotonic(), 0.001))
            except grpc.aio.AioRpcError as exc:
                code, details, hint = exc.code(), exc.details() or "", retry_after_hint(exc)
                metadata = speechrl_metadata(exc)
                if attempts >= self.retry.max_attempts or not self.retry.should_retry(code, details):
                    raise self._error(code, details, index, attempts, hint, metadata) from None
                wait = self.retry.delay_s(attempts - 1, hint, self._rng)
                if time.monotonic() + wait >= deadline:
                    details += f" (gave up: no time for another attempt within the {timeout_s:g} s deadline)"
                    raise self._error(code, details, index, attempts, hint, metadata) from None
                log.info("%s to %s failed with %s (%s); retry %d in %.3f s", what, self.endpoints[index],
                         code.name, details, attempts, wait)
                await asyncio.sleep(wait)

    def _error(self, code: grpc.StatusCode, details: str, index: int, attempts: int, hint: float | None,
               metadata: dict[str, str]) -> ServiceError:
        error_class = StaleFenceError if metadata.get("speechrl-error-code") == "STALE_FENCE" else ServiceError
        return error_class(code, details, endpoint=self.endpoints[index], attempts=attempts, retry_after_s=hint,
                           metadata=metadata)

    async def unary(self, stub_class: type, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """Call a unary RPC with retries; returns its response."""

        async def attempt(index: int, seconds_left: float) -> Any:
            rpc = getattr(self.stub(stub_class, index), method)
            return await rpc(request, timeout=seconds_left, metadata=self.call_metadata())

        with _client_span(stub_class, method):
            return await self.call(attempt, timeout_s, method)

    async def server_stream(self, stub_class: type, method: str, request: Any, timeout_s: float | None = None) -> list[Any]:
        """Call a server-streaming RPC with retries; returns every response of the stream.

        A stream that fails part-way is retried whole: the calls it serves (encoding) are pure, and
        a half-answered batch is no use to the caller.
        """

        async def attempt(index: int, seconds_left: float) -> list[Any]:
            rpc = getattr(self.stub(stub_class, index), method)
            return [response async for response in rpc(request, timeout=seconds_left, metadata=self.call_metadata())]

        with _client_span(stub_class, method):
            return await self.call(attempt, timeout_s, method)

    async def health(self, service: str, timeout_s: float = 1.0) -> dict[str, str]:
        """grpc.health.v1 status of `service` at every endpoint, e.g. {"127.0.0.1:50053": "SERVING"}.

        An endpoint that does not answer reports its gRPC status instead, e.g. "UNAVAILABLE".
        """

        async def check(index: int) -> str:
            stub = self.stub(health_pb2_grpc.HealthStub, index)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                                         metadata=self.metadata)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

        states = await asyncio.gather(*(check(i) for i in range(len(self.endpoints))))
        return dict(zip(self.endpoints, states, strict=True))

    async def wait_until_ready(self, service: str, timeout_s: float, all_endpoints: bool = False) -> dict[str, str]:
        """Poll health until one endpoint (or every one) reports SERVING; raise ServiceError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            states = await self.health(service, timeout_s=min(max(left, 0.01), 2.0))
            serving = [s == "SERVING" for s in states.values()]
            if all(serving) if all_endpoints else any(serving):
                return states
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                   f"{service} not ready after {timeout_s:g} s: {states}", attempts=0)
            await asyncio.sleep(min(0.1, left))

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        await asyncio.gather(*(c.close(None) for c in channels))
