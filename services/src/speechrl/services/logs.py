"""Logging of every service: text or JSON lines, each carrying the request id of the call it serves.

The request id lives in `speechrl.client.REQUEST_ID`, a contextvar: the gateway sets it from (or
creates) the `x-request-id` header, the client SDK sends it on as gRPC metadata, and a scorer's
interceptor sets it again from that metadata, so one id follows a call from gateway to scorer and
every log line written while serving the call names it.

>>> import io
>>> stream = io.StringIO()
>>> logger = logging.getLogger("speechrl.doctest")
>>> handler = logging.StreamHandler(stream)
>>> handler.setFormatter(JsonFormatter())
>>> handler.addFilter(RequestIdFilter())
>>> logger.addHandler(handler)
>>> token = REQUEST_ID.set("abc123")
>>> logger.warning("hello %s", "world")
>>> REQUEST_ID.reset(token)
>>> line = json.loads(stream.getvalue())
>>> line["message"], line["request_id"], line["level"]
('hello world', 'abc123', 'WARNING')
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from speechrl.client import REQUEST_ID

LOG_FORMATS = ("text", "json")
access_log = logging.getLogger("speechrl.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# Attributes every LogRecord has; anything else was passed with `extra=` and goes into the JSON line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current call's id, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get() or None,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(log_format: str = "text", level: str | int = logging.INFO) -> None:
    """Route the root logger to stderr in `log_format` (text or json), every line with its request id."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be text or json, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def clean_request_id(raw: str | None) -> str:
    """The caller's request id when it is short and plain (it goes into logs and headers), else a new one.

    >>> clean_request_id("job-7.step-3"), len(clean_request_id("bad id\\n")), len(clean_request_id(None))
    ('job-7.step-3', 32, 32)
    """
    if raw and len(raw) <= 128 and set(raw) <= _ID_CHARS:
        return raw
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI middleware of the HTTP services: the request's `x-request-id` (or a new one) goes into
    REQUEST_ID for the request's log lines and outgoing gRPC calls, and back in the reply's header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"), None)
        request_id = clean_request_id(raw)

        status = 500  # what an exception that escapes every handler becomes

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info("%s %s %s in %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - started) * 1e3)
            REQUEST_ID.reset(token)
