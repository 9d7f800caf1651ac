"""The caller's deadline, passed on: `X-Request-Timeout: <seconds>` bounds every scorer call a request makes.

A trainer that gives up on a reward after 2 s should not leave the scorers computing it for 30:
the header sets the SDK's CALLER_DEADLINE for the request, each scorer call's gRPC deadline becomes
the shorter of it and the gateway's own request_timeout_s, a call past it answers 504, and the
scorer drops the item instead of running it (speechrl_items_expired_total). Without the header the
gateway's request_timeout_s alone applies.
"""

from __future__ import annotations

import json
import math
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from speechrl.client import CALLER_DEADLINE

HEADER = b"x-request-timeout"


class DeadlineMiddleware:
    """Pure ASGI middleware: a valid X-Request-Timeout sets CALLER_DEADLINE; a malformed one is 400."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = next((v for k, v in scope.get("headers", []) if k.lower() == HEADER), None) if scope["type"] == "http" else None
        if raw is None:
            await self.app(scope, receive, send)
            return
        try:
            seconds = float(raw.decode("latin-1"))
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            await _bad_header(send, f"X-Request-Timeout must be a positive number of seconds, got {raw.decode('latin-1')!r}")
            return
        token = CALLER_DEADLINE.set(time.monotonic() + seconds)
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER_DEADLINE.reset(token)


async def _bad_header(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail, "field": "X-Request-Timeout"}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
