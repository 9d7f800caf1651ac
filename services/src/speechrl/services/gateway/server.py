"""Entry point of the gateway: `speechrl serve gateway` runs the app under uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import uvicorn

from speechrl.services.config import parse_config
from speechrl.services.gateway.config import SERVICE, GatewayConfig
from speechrl.services.gateway.main import create_app


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GatewayConfig, SERVICE, argv, description="Serve the REST gateway of the SpeechRL scorers.")
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn drains in-flight requests on SIGTERM for up to grace_seconds, then closes the scorer channels.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=int(config.grace_seconds))
