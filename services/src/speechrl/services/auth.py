"""Bearer tokens: where they come from, how a presented one is checked, and the HTTP middleware.

Tokens come from an environment variable (a comma-separated list, e.g. from a Kubernetes Secret
via `envFrom`) and/or a file with one token per line (a mounted Secret: the file is re-read
when it changes, checked at most once a second, and on SIGHUP). No token configured means
authentication is off, the CPU-laptop default. A configured file that is missing or empty
accepts nothing (fail closed) rather than turning authentication off.

Tokens are compared with `hmac.compare_digest` against every accepted token, so the time a
check takes does not tell how much of a guess was right.

>>> store = TokenStore("alpha, beta")
>>> store.enabled, store.check("Bearer beta"), store.check("Bearer gamma"), store.check(None)
(True, None, 'wrong token', 'no authorization metadata')
>>> TokenStore("").check(None) is None  # auth off
True
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

RELOAD_CHECK_SECONDS = 1.0
# Paths the HTTP services answer without a token: liveness, readiness, metrics, API docs.
OPEN_HTTP_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json")


def _split(raw: str) -> set[str]:
    return {t.strip() for t in raw.replace("\n", ",").split(",") if t.strip() and not t.strip().startswith("#")}


class TokenStore:
    """The accepted bearer tokens: `tokens` (comma-separated) plus those in `token_file`."""

    def __init__(self, tokens: str = "", token_file: str = ""):
        self.static = _split(tokens)
        self.token_file = token_file
        self._file_tokens: set[str] = set()
        self._mtime: float | None = None
        self._checked = 0.0
        if token_file:
            self.reload()

    @property
    def enabled(self) -> bool:
        """Whether a token is required (any token or a token file configured)."""
        return bool(self.static or self.token_file)

    def reload(self) -> None:
        """Read the token file again (on SIGHUP, or when its modification time changed)."""
        if not self.token_file:
            return
        try:
            mtime = os.stat(self.token_file).st_mtime
            with open(self.token_file, encoding="utf-8") as f:
                self._file_tokens = _split(f.read())
        except OSError as exc:
            log.warning("token file %s unreadable (%s): accepting only the tokens of the environment",
                        self.token_file, exc)
            self._file_tokens, mtime = set(), -1.0
        self._mtime = mtime
        log.info("token file %s: %d tokens", self.token_file, len(self._file_tokens))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if not self.token_file or now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        try:
            mtime = os.stat(self.token_file).st_mtime
        except OSError:
            mtime = -1.0
        if mtime != self._mtime:
            self.reload()

    def tokens(self) -> Iterable[str]:
        self._maybe_reload()
        return self.static | self._file_tokens

    def check(self, authorization: str | None) -> str | None:
        """None when `authorization` ("Bearer <token>") is accepted, else the reason it is not."""
        if not self.enabled:
            return None
        if not authorization:
            return "no authorization metadata"
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "authorization is not 'Bearer <token>'"
        given = presented.strip().encode()
        # Compare against every token (no early exit) so timing does not say which one nearly matched.
        ok = False
        for token in self.tokens():
            ok |= hmac.compare_digest(given, token.encode())
        return None if ok else "wrong token"


class BearerAuthMiddleware:
    """Pure ASGI middleware: 401 with WWW-Authenticate unless `Authorization: Bearer <token>` is
    accepted; the open paths (health, readiness, metrics, docs) need no token. The refusal is
    logged with method, path, client and reason, never the body."""

    def __init__(self, app: ASGIApp, store: TokenStore, open_paths: Iterable[str] = OPEN_HTTP_PATHS):
        self.app = app
        self.store = store
        self.open_paths = tuple(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.store.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        reason = self.store.check(headers.get("authorization"))
        if reason is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        log.warning("unauthenticated %s %s from %s: %s", scope["method"], scope["path"],
                    f"{client[0]}:{client[1]}" if client else "?", reason)
        body = b'{"detail":"unauthenticated: ' + reason.encode() + b'"}'
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="speechrl"')]})
        await send({"type": "http.response.body", "body": body})
