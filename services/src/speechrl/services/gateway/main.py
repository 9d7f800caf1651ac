"""The gateway app: `create_app(config)` wires config, scorer clients, routers, errors and metrics.

>>> from fastapi.testclient import TestClient
>>> app = create_app(GatewayConfig(intelligibility="", speaker="", rules=""))
>>> TestClient(app).get("/healthz").json()
{'status': 'ok'}
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from speechrl.adapters.token2wav import token2wav_service
from speechrl.services import __version__
from speechrl.services.auth import OPEN_HTTP_PATHS, BearerAuthMiddleware, TokenStore
from speechrl.services.gateway import ui
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.dashboard import Sources
from speechrl.services.gateway.deadline import DeadlineMiddleware
from speechrl.services.gateway.deps import Scorers
from speechrl.services.gateway.errors import add_error_handlers
from speechrl.services.gateway.metrics import MetricsMiddleware
from speechrl.services.gateway.prompts import PromptPool
from speechrl.services.gateway.routes import ROUTERS
from speechrl.services.gateway.routes.dashboard import AUTH_PATH
from speechrl.services.logs import RequestIdMiddleware
from speechrl.services.tracing import trace_http

DESCRIPTION = """REST/JSON front of the SpeechRL reward services.

Batch routes answer one result per item, in order: an item that cannot be scored has `error`
(code, message, field) instead of `score`, and its neighbours are unaffected. A request that is
malformed as a whole gets 422 (schema) or 400 (a field the gateway cannot use, e.g. bad base64),
with the field named; an overloaded scorer gives 429 with Retry-After, a down one 503, a slow one 504.
"""


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    """The FastAPI app of the gateway for config (defaults: local scorers on their usual ports)."""
    config = config or GatewayConfig()
    scorers = Scorers.from_config(config)
    dashboard = Sources.from_config(config)  # what /ui shows: every service, the lease, the trainer's jobs

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await scorers.close()
        await dashboard.close()

    app = FastAPI(title="SpeechRL gateway", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.config = config
    app.state.scorers = scorers
    app.state.dashboard = dashboard
    app.state.tokens = TokenStore(config.auth_tokens, config.auth_token_file)
    if scorers.token2wav is not None:  # tests and embedders may attach their own callable instead
        prompts = None if not config.token2wav_prompts else PromptPool.from_folder(
            config.token2wav_prompts, None if config.token2wav_prompt_seed < 0 else config.token2wav_prompt_seed)
        app.state.token2wav = token2wav_service(scorers.token2wav, None if prompts is None else prompts.draw_audio)
    for router in ROUTERS:
        app.include_router(router)
    add_error_handlers(app)
    # The last added runs first: request id, then the trace span (SPEECHRL_TRACING), then metrics
    # (refusals counted too), then the token check, then the caller's deadline.
    app.add_middleware(DeadlineMiddleware)
    # The dashboard page and its assets load without a token (they hold no data) and then ask for one.
    app.add_middleware(BearerAuthMiddleware, store=app.state.tokens,
                       open_paths=(*OPEN_HTTP_PATHS, *ui.OPEN_PATHS, AUTH_PATH))
    app.add_middleware(MetricsMiddleware)
    trace_http(app, "speechrl-gateway")
    app.add_middleware(RequestIdMiddleware)
    return app
