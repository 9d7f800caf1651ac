"""The clients the dashboard reads through, made once per gateway app and closed with it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
import redis
import redis.asyncio as aioredis

from speechrl.client import (
    AsyncAudioEncoderClient,
    AsyncClient,
    AsyncIntelligibilityClient,
    AsyncRolloutClient,
    AsyncRuleRewardsClient,
    AsyncSpeakerClient,
    AsyncToken2WavClient,
    ClientOptions,
    RetryPolicy,
)
from speechrl.client._channel import env_token
from speechrl.services.gateway.config import BACKENDS, WATCHED, GatewayConfig
from speechrl.services.gateway.dashboard.jobs import TrainerProxy
from speechrl.services.gateway.dashboard.services import RateWindow

CLIENTS: dict[str, type[AsyncClient]] = {
    "intelligibility": AsyncIntelligibilityClient, "speaker": AsyncSpeakerClient, "rules": AsyncRuleRewardsClient,
    "token2wav": AsyncToken2WavClient, "encoder": AsyncAudioEncoderClient, "rollout": AsyncRolloutClient}
# A status poll must never queue behind a down service: one attempt, a short deadline. The page polls
# every ~1.5 s, so a service that does not answer within this shows as down on the next frame.
STATUS_TIMEOUT_S = 2.0


@dataclass
class Sources:
    """Status clients of every configured service (by name), the lease's Redis, the trainer's job API."""

    status: dict[str, AsyncClient]
    metrics: dict[str, str]  # service -> host:port of its Prometheus /metrics
    lease: aioredis.Redis | None
    ledger: redis.Redis | None
    trainer: TrainerProxy | None
    scrape: httpx.AsyncClient
    windows: dict[str, RateWindow] = field(default_factory=dict)  # per service: counters over the last seconds

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Sources:
        # The SDK clients open their channels lazily, inside the server's loop: nothing connects until /ui asks.
        options: ClientOptions = {"timeout_s": STATUS_TIMEOUT_S, "token": config.scorer_token or None,
                                  "retry": RetryPolicy(max_attempts=1)}
        if config.scorer_tls_root_cert or config.scorer_tls_client_cert:
            options["tls_root_cert"] = config.scorer_tls_root_cert or None
            options["tls_client_cert"] = config.scorer_tls_client_cert or None
            options["tls_client_key"] = config.scorer_tls_client_key or None
        status = {name: CLIENTS[name](list(config.endpoints(name)), **options)
                  for name in (*BACKENDS, *WATCHED) if config.endpoints(name)}
        lease = ledger = None
        if config.redis_url:
            lease = aioredis.Redis.from_url(config.redis_url, socket_timeout=STATUS_TIMEOUT_S,
                                            socket_connect_timeout=STATUS_TIMEOUT_S)
            ledger = redis.Redis.from_url(config.redis_url, socket_timeout=STATUS_TIMEOUT_S,
                                          socket_connect_timeout=STATUS_TIMEOUT_S)
        trainer = None
        if config.trainer:
            token = config.scorer_token or env_token()
            trainer = TrainerProxy(httpx.AsyncClient(
                base_url=config.trainer, timeout=5.0, headers={"Authorization": f"Bearer {token}"} if token else {},
                verify=config.scorer_tls_root_cert or True))
        return cls(status=status, metrics=config.metrics_endpoints(), lease=lease, ledger=ledger, trainer=trainer,
                   scrape=httpx.AsyncClient(timeout=STATUS_TIMEOUT_S))

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.status.values()))
        await self.scrape.aclose()
        if self.trainer is not None:
            await self.trainer.close()
        if self.lease is not None:
            await self.lease.aclose()
        if self.ledger is not None:
            self.ledger.close()
