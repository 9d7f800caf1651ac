"""The interceptor every gRPC server runs its calls through: token, concurrency bound, request id, metrics.

For each call, in order: health checks and reflection pass untouched (probes and grpcurl need no
token); a call without an accepted bearer token ends UNAUTHENTICATED (logged with method, peer and
reason, never the payload); request bytes that are not the method's message end INVALID_ARGUMENT
naming it; a call past `max_concurrent_requests` ends RESOURCE_EXHAUSTED with a
`retry-after-ms` trailer (the client SDK waits that long and retries); then the call runs with its
`x-request-id` (the caller's, or a new one) in the logging contextvar and in its trailing metadata,
inside a server span that continues the caller's `traceparent` when tracing is on (tracing.py), and
is counted by method and status code with its latency.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge, Histogram

from speechrl.client import REQUEST_ID
from speechrl.services import tracing
from speechrl.services.auth import TokenStore
from speechrl.services.logs import clean_request_id

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
RETRY_AFTER_MS = 100

REQUESTS = Counter("speechrl_grpc_requests_total", "gRPC calls answered, by method and status code",
                   ["method", "code"])
LATENCY = Histogram("speechrl_grpc_request_seconds", "Time to answer a gRPC call, by method",
                    ["method"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("speechrl_grpc_requests_in_flight", "gRPC calls being answered now")


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio keeps the raw integer set by abort()
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    return "OK" if failed is None else ("CANCELLED" if isinstance(failed, BaseException)
                                        and type(failed).__name__ == "CancelledError" else "UNKNOWN")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Auth, the concurrency bound, request ids and per-RPC metrics for one server."""

    def __init__(self, tokens: TokenStore, max_concurrent_requests: int):
        tracing.setup("speechrl")  # on with SPEECHRL_TRACING; OTEL_SERVICE_NAME names the service
        self.tokens = tokens
        self.max_concurrent = max_concurrent_requests
        self.in_flight = 0  # the server's event loop is the only writer: no lock
        self.refused_busy = 0

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        denied = self.tokens.check(_metadata(handler_call_details, "authorization"))
        request_id = clean_request_id(_metadata(handler_call_details, "x-request-id"))
        return _wrap(handler, lambda context: _Call(self, context, method, denied, request_id), method)


class _Call:
    """One call's checks and bookkeeping, around its behaviour (`async with`)."""

    def __init__(self, interceptor: ServerInterceptor, context: grpc.aio.ServicerContext, method: str,
                 denied: str | None, request_id: str):
        self.interceptor = interceptor
        self.context = context
        self.method = method
        self.denied = denied
        self.request_id = request_id
        self.started = time.perf_counter()
        self.holds_slot = False
        self.span: tracing.RpcSpan | None = None

    async def __aenter__(self) -> _Call:
        self.token = REQUEST_ID.set(self.request_id)
        # After the id, which the span carries; the metadata is read only when tracing is on.
        self.span = tracing.rpc_span(self.method, self.context.invocation_metadata()) if tracing.enabled() else None
        self.context.set_trailing_metadata((("x-request-id", self.request_id),))
        try:
            await self._admit()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, None)
            raise
        return self

    async def _admit(self) -> None:
        owner = self.interceptor
        if self.denied is not None:
            log.warning("unauthenticated call to %s from %s: %s", self.method, self.context.peer(), self.denied)
            await self.context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {self.denied}")
        if owner.max_concurrent and owner.in_flight >= owner.max_concurrent:
            owner.refused_busy += 1
            self.context.set_trailing_metadata((("x-request-id", self.request_id),
                                                ("retry-after-ms", str(RETRY_AFTER_MS))))
            await self.context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_concurrent_requests: {owner.max_concurrent} calls already in flight on this server; "
                f"retry after {RETRY_AFTER_MS} ms")
        owner.in_flight += 1
        IN_FLIGHT.inc()
        self.holds_slot = True

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self.holds_slot:
            self.interceptor.in_flight -= 1
            IN_FLIGHT.dec()
            self.holds_slot = False
        code, seconds = _code(self.context, exc), time.perf_counter() - self.started
        REQUESTS.labels(self.method, code).inc()
        LATENCY.labels(self.method).observe(seconds)
        # One line per call, at DEBUG for the OK ones: a busy scorer answers thousands a second.
        log.log(logging.DEBUG if code == "OK" else logging.INFO, "%s %s in %.1f ms", self.method, code, seconds * 1e3)
        if self.span is not None:
            self.span.end(code, exc)
        REQUEST_ID.reset(self.token)


async def _parsed(raw: Any, deserialize: Callable[[bytes], Any] | None, context: grpc.aio.ServicerContext,
                  method: str) -> Any:
    """The request message of raw bytes; bytes that are not one end the call INVALID_ARGUMENT.

    gRPC would deserialize before the handler runs and answer UNKNOWN ("Unexpected error"), which a
    caller cannot tell from a fault of the server's own.
    """
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as error:
        message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
        name = message.full_name if message is not None else "request message"
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request bytes are not a {name} ({error})")


def _wrap(handler: grpc.RpcMethodHandler, guard: Callable[[grpc.aio.ServicerContext], Any],
          method: str = "") -> grpc.RpcMethodHandler:
    """The same handler with its behaviour run inside `guard(context)`; a unary request is parsed there too
    (after the token check, so unauthenticated garbage is still UNAUTHENTICATED)."""
    deserialize = handler.request_deserializer

    def unary_result(behaviour: Callable[..., Any], parse: bool) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                if parse:
                    request = await _parsed(request, deserialize, context, method)
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
        return run

    def stream_result(behaviour: Callable[..., Any], parse: bool) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context):
                if parse:
                    request = await _parsed(request, deserialize, context, method)
                result = behaviour(request, context)
                if inspect.isawaitable(result):  # a coroutine that writes with context.write()
                    await result
                    return
                if hasattr(result, "__aiter__"):
                    async for reply in result:
                        yield reply
                else:
                    for reply in result:
                        yield reply
        return run

    # Unary requests arrive as bytes (no deserializer) and are parsed in the guard; streamed ones keep theirs.
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_result(handler.unary_unary, True), None,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_result(handler.unary_stream, True), None,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_result(handler.stream_unary, False), deserialize,
                                                    handler.response_serializer)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(stream_result(handler.stream_stream, False), deserialize,
                                                 handler.response_serializer)
