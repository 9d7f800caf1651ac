"""Dependencies of the routes, as `Annotated` aliases: the scorer clients of the running app.

The clients are made once per app (`Scorers.from_config`) and closed when it shuts down; each
alias hands a route its client, or answers 503 when the gateway has no endpoints for that scorer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from speechrl.client import (
    AsyncIntelligibilityClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
    ClientOptions,
    RetryPolicy,
)
from speechrl.services.gateway.config import BACKENDS, GatewayConfig
from speechrl.services.gateway.errors import ScorerOff

AnyScorer = AsyncIntelligibilityClient | AsyncSpeakerClient | AsyncRuleRewardsClient | AsyncToken2WavClient


@dataclass
class Scorers:
    """The SDK client of each configured scorer (and of token2wav); None where the gateway has no endpoints for it."""

    intelligibility: AsyncIntelligibilityClient | None
    speaker: AsyncSpeakerClient | None
    rules: AsyncRuleRewardsClient | None
    token2wav: AsyncToken2WavClient | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Scorers:
        # Channels open lazily on the first call, inside the server's event loop.
        options: ClientOptions = {"timeout_s": config.request_timeout_s, "token": config.scorer_token or None,
                                  "retry": RetryPolicy(max_attempts=config.max_attempts)}
        if config.scorer_tls_root_cert or config.scorer_tls_client_cert:
            options["tls_root_cert"] = config.scorer_tls_root_cert or None
            options["tls_client_cert"] = config.scorer_tls_client_cert or None
            options["tls_client_key"] = config.scorer_tls_client_key or None
        ends = {name: list(config.endpoints(name)) for name in BACKENDS}
        return cls(
            intelligibility=AsyncIntelligibilityClient(ends["intelligibility"], **options) if ends["intelligibility"] else None,
            speaker=AsyncSpeakerClient(ends["speaker"], **options) if ends["speaker"] else None,
            rules=AsyncRuleRewardsClient(ends["rules"], **options) if ends["rules"] else None,
            token2wav=AsyncToken2WavClient(ends["token2wav"], **options) if ends["token2wav"] else None)

    def configured(self) -> dict[str, AnyScorer]:
        """The services this gateway calls, by name (readiness waits for each)."""
        named = {name: getattr(self, name) for name in BACKENDS}
        return {name: client for name, client in named.items() if client is not None}

    async def health(self, timeout_s: float) -> dict[str, dict[str, str]]:
        """grpc.health.v1 state of every endpoint of every configured scorer, asked concurrently."""
        configured = self.configured()
        states = await asyncio.gather(*(client.health(timeout_s) for client in configured.values()))
        return dict(zip(configured, states, strict=True))

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.configured().values()))


async def get_config(request: Request) -> GatewayConfig:
    return request.app.state.config  # type: ignore[no-any-return]


async def get_scorers(request: Request) -> Scorers:
    return request.app.state.scorers  # type: ignore[no-any-return]


ConfigDep = Annotated[GatewayConfig, Depends(get_config)]
ScorersDep = Annotated[Scorers, Depends(get_scorers)]


async def _intelligibility(scorers: ScorersDep) -> AsyncIntelligibilityClient:
    if scorers.intelligibility is None:
        raise ScorerOff("intelligibility")
    return scorers.intelligibility


async def _speaker(scorers: ScorersDep) -> AsyncSpeakerClient:
    if scorers.speaker is None:
        raise ScorerOff("speaker")
    return scorers.speaker


async def _rules(scorers: ScorersDep) -> AsyncRuleRewardsClient:
    if scorers.rules is None:
        raise ScorerOff("rules")
    return scorers.rules


IntelligibilityDep = Annotated[AsyncIntelligibilityClient, Depends(_intelligibility)]
SpeakerDep = Annotated[AsyncSpeakerClient, Depends(_speaker)]
RulesDep = Annotated[AsyncRuleRewardsClient, Depends(_rules)]
