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

from speechrl.adapters.common import token2wav_service
from speechrl.services import __version__
from speechrl.services.auth import BearerAuthMiddleware, TokenStore
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.deadline import DeadlineMiddleware
from speechrl.services.gateway.deps import Scorers
from speechrl.services.gateway.errors import add_error_handlers
from speechrl.services.gateway.metrics import MetricsMiddleware
from speechrl.services.gateway.prompts import PromptPool
from speechrl.services.gateway.routes import ROUTERS
from speechrl.services.logs import RequestIdMiddleware

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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await scorers.close()

    app = FastAPI(title="SpeechRL gateway", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.config = config
    app.state.scorers = scorers
    if scorers.token2wav is not None:  # tests and embedders may attach their own callable instead
        prompts = None if not config.token2wav_prompts else PromptPool.from_folder(
            config.token2wav_prompts, None if config.token2wav_prompt_seed < 0 else config.token2wav_prompt_seed)
        app.state.token2wav = token2wav_service(scorers.token2wav, None if prompts is None else prompts.draw_audio)
    for router in ROUTERS:
        app.include_router(router)
    add_error_handlers(app)
    # The last added runs first: request id, then metrics (refusals counted too), then the token
    # check, then the caller's deadline.
    app.add_middleware(DeadlineMiddleware)
    app.add_middleware(BearerAuthMiddleware, store=TokenStore(config.auth_tokens, config.auth_token_file))
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
