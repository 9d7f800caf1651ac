"""Entry point of the gateway: `speechrl serve gateway` runs the app under uvicorn."""

from __future__ import annotations

from collections.abc import Sequence

import uvicorn

from speechrl.services.config import parse_config
from speechrl.services.gateway.config import SERVICE, GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.logs import configure_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GatewayConfig, SERVICE, argv, description="Serve the REST gateway of the SpeechRL scorers.")
    configure_logging(config.log_format, config.log_level)
    # uvicorn drains in-flight requests on SIGTERM for up to grace_seconds, then closes the scorer channels.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=int(config.grace_seconds),
                access_log=False)  # speechrl.access logs each request with its request id instead
