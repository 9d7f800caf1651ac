"""Tracing, off by default: OpenTelemetry spans from the gateway through the scorers, and of each training step.

`SPEECHRL_TRACING=1` turns it on, the one switch of every process (the gateway, each gRPC service, the
trainer). The standard variables say the rest: `OTEL_TRACES_EXPORTER` (otlp, the default, needs
opentelemetry-exporter-otlp-proto-http or -grpc installed; console; none), `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `_TRACES_ENDPOINT`, `_PROTOCOL`, `_HEADERS`: read by the exporter itself), `OTEL_SERVICE_NAME` (else
the name the process gives `setup`). Off, nothing here imports opentelemetry (FastAPI and redis import
its API themselves, never the tracing SDK) and each helper returns at its first line.

One gateway request is one trace:

    POST /v1/rules/score                    gateway: server span (FastAPI 0.165+ opens it, else HttpSpans)
      fastapi.endpoint                      FastAPI's own, where it opens the server span
        speechrl.v1.RuleRewards/ScoreRules  client SDK: client span, all attempts and backoff inside
          speechrl.v1.RuleRewards/ScoreRules  rules service: server span (interceptor.py)

The context crosses each gRPC hop as W3C `traceparent` metadata, added by the client SDK next to
`x-request-id` (speechrl.client._channel: the client cannot import this module) and read by the
interceptor. Every span started while a request id is set (logs.RequestIdMiddleware, the interceptor)
carries it as `speechrl.request_id`. A training step is `train.step`, with one child per phase
(`train.encode`, `train.rollout`, `train.score`, `train.update`, `train.sync`; a TTS job's `train.token2wav`).

>>> switched_on({"SPEECHRL_TRACING": "1"}), switched_on({"SPEECHRL_TRACING": "0"}), switched_on({})
(True, False, False)
>>> with span("train.step", {"speechrl.step": 1}):  # a span when tracing is on; nothing when off
...     pass
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from speechrl.client import REQUEST_ID

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import Tracer

SWITCH = "SPEECHRL_TRACING"
REQUEST_ID_ATTRIBUTE = "speechrl.request_id"
_ON = frozenset({"1", "true", "yes", "on"})  # the values the client SDK takes too (speechrl.client._channel)
# The OTLP exporter of each OTEL_EXPORTER_OTLP_PROTOCOL, in the order tried when none is set.
_OTLP = {"http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
         "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"}
# The codes that are the server's failure, per OpenTelemetry's gRPC conventions (the others are the caller's).
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

_tracer: Tracer | None = None
_processors: list[Any] = []  # the span processors setup added, for shutdown


def switched_on(environ: Mapping[str, str] | None = None) -> bool:
    """Whether SPEECHRL_TRACING asks for tracing (1, true, yes or on)."""
    env = os.environ if environ is None else environ
    return env.get(SWITCH, "").strip().lower() in _ON


def enabled() -> bool:
    """Whether this process traces: `setup` ran with the switch on."""
    return _tracer is not None


def setup(service_name: str, exporter: Any = None) -> bool:
    """Trace this process if SPEECHRL_TRACING is on; returns whether it traces. Later calls change nothing.

    Sets the global tracer provider, service.name `service_name` unless OTEL_SERVICE_NAME says otherwise,
    exporting to OTEL_TRACES_EXPORTER's exporters, or to `exporter` when given (tests pass an
    InMemorySpanExporter; spans reach it as they end). A provider the process already has (e.g. under
    `opentelemetry-instrument`) is kept with its own exporters.
    """
    global _tracer
    if _tracer is not None or not switched_on():
        return _tracer is not None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as error:
        raise RuntimeError(f"{SWITCH} is on but OpenTelemetry's SDK is missing: "
                           "pip install 'speechrl-services[tracing]'") from error

    class RequestIdStamp(SpanProcessor):
        """Puts the request id being served on each span as it starts."""

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            request_id = REQUEST_ID.get()
            if request_id:
                span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

    provider: Any = trace.get_tracer_provider()
    ours = isinstance(provider, trace.ProxyTracerProvider)
    if ours:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    processors: list[Any] = [RequestIdStamp()]
    if exporter is not None:
        processors.append(SimpleSpanProcessor(exporter))
    elif ours:
        processors += [BatchSpanProcessor(e) for e in _env_exporters()]
    for processor in processors:
        provider.add_span_processor(processor)
    if ours:
        trace.set_tracer_provider(provider)
    _processors.extend(processors)
    _tracer = provider.get_tracer("speechrl")
    return True


def _env_exporters() -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names (comma-separated; otlp when unset)."""
    exporters = []
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(","):
        name = name.strip()
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter())
        elif name not in ("none", ""):
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: SpeechRL exports spans with otlp, console or none")
    return exporters


def _otlp_exporter() -> Any:
    """The OTLP exporter of OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL, else http/protobuf's or grpc's, whichever is installed."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol not in _OTLP:
        raise ValueError(f"OTLP protocol {protocol!r}: SpeechRL exports spans over {' or '.join(_OTLP)}")
    for name in [protocol] if protocol else list(_OTLP):
        try:
            module = importlib.import_module(_OTLP[name])
        except ImportError:
            continue
        return module.OTLPSpanExporter()  # endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*
    wanted = "grpc" if protocol == "grpc" else "http"
    raise RuntimeError(f"OTEL_TRACES_EXPORTER=otlp needs `pip install opentelemetry-exporter-otlp-proto-{wanted}`; "
                       "or set OTEL_TRACES_EXPORTER=console (stdout) or none")


def shutdown() -> None:
    """Export what is pending and stop tracing in this process (a process's exit flushes by itself)."""
    global _tracer
    _tracer = None
    while _processors:
        _processors.pop().shutdown()


def span(name: str, attributes: Mapping[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A span around a block, child of the current one: `with span("train.update"): ...`; nothing when off."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


class RpcSpan:
    """The server span of one gRPC call, a child of the caller's `traceparent`; current until `end`."""

    def __init__(self, tracer: Tracer, method: str, metadata: Iterable[tuple[str, Any]] | None):
        from opentelemetry import context, propagate, trace

        parent = propagate.extract({key: value for key, value in metadata or () if isinstance(value, str)})
        full_name = method.lstrip("/")  # "speechrl.v1.RuleRewards/ScoreRules", as the client span is named
        service, _, name = full_name.rpartition("/")
        self.span = tracer.start_span(full_name, parent, trace.SpanKind.SERVER,
                                      {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        self._token = context.attach(trace.set_span_in_context(self.span, parent))

    def end(self, code: str, error: BaseException | None = None) -> None:
        """End the span with the call's gRPC status code (its name, e.g. "OK")."""
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        self.span.set_attribute("rpc.response.status_code", code)
        if code in _SERVER_ERRORS:
            if error is not None:
                self.span.record_exception(error)
            self.span.set_status(StatusCode.ERROR, code)
        context.detach(self._token)
        self.span.end()


def rpc_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> RpcSpan | None:
    """The server span of a gRPC call to method ("/package.Service/Method"), made current; None when off."""
    return None if _tracer is None else RpcSpan(_tracer, method, metadata)


class HttpSpans:
    """Pure ASGI middleware: the server span of each HTTP request, carrying its request id.

    FastAPI 0.165+ opens that span itself once a tracer provider is set (its native telemetry, which
    reads the caller's `traceparent`); then this only adds the request id. Under an older FastAPI, or
    with its telemetry off, this opens the span. Add it inside RequestIdMiddleware, which sets the id.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        current = trace.get_current_span()
        if current.is_recording():  # FastAPI's own server span
            request_id = REQUEST_ID.get()
            if request_id:
                current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
            await self.app(scope, receive, send)
            return
        status = 500  # what an exception that escapes every handler becomes

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        parent = propagate.extract({k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])})
        with _tracer.start_as_current_span(scope["method"], parent, SpanKind.SERVER, {
                "http.request.method": scope["method"], "url.path": scope["path"]}) as server:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", None)  # set by the router: low cardinality
                if route:
                    server.update_name(f"{scope['method']} {route}")
                    server.set_attribute("http.route", route)
                server.set_attribute("http.response.status_code", status)
                if status >= 500:
                    server.set_status(StatusCode.ERROR)


def trace_http(app: FastAPI, service_name: str) -> None:
    """When SPEECHRL_TRACING is on, set this process up as service_name and add HttpSpans to app; else nothing.

    Call it just before adding RequestIdMiddleware (the last added runs first), so the span knows its id.
    """
    if setup(service_name):
        app.add_middleware(HttpSpans)
