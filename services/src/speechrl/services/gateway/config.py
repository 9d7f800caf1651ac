"""Settings of the gateway: `speechrl serve gateway --flag` or SPEECHRL_GATEWAY_* variables."""

from __future__ import annotations

import math
from dataclasses import dataclass

from speechrl.client import parse_endpoints
from speechrl.services.config import ListenerConfig, option
from speechrl.services.ports import DEFAULT_PORTS

SERVICE = "gateway"
SCORERS = ("intelligibility", "speaker", "rules")
BACKENDS = (*SCORERS, "token2wav")  # every service the gateway calls
WATCHED = ("encoder", "rollout")  # services only the dashboard (/ui) reads the status of
ERROR_UNITS = ("word", "character", "pinyin")  # speechrl.v1.ErrorUnit's values


@dataclass
class GatewayConfig(ListenerConfig):
    """Settings of the REST gateway. Every scorer is a comma-separated list of host:port replicas."""

    port: int = option(DEFAULT_PORTS["gateway"], "HTTP port.")
    intelligibility: str = option(f"127.0.0.1:{DEFAULT_PORTS['intelligibility']}",
                                  "Intelligibility scorer endpoints, e.g. 'a:50051,b:50051'; empty turns its routes off.")
    speaker: str = option(f"127.0.0.1:{DEFAULT_PORTS['speaker']}",
                          "Speaker-similarity scorer endpoints; empty turns its routes off.")
    rules: str = option(f"127.0.0.1:{DEFAULT_PORTS['rules']}", "Rule-reward service endpoints; empty turns its routes off.")
    token2wav: str = option("", "Token2wav service endpoints (speech tokens -> audio for the token2wav_asr routes), e.g. "
                                f"127.0.0.1:{DEFAULT_PORTS['token2wav']}; `speechrl up` and docker-compose.yml set it "
                                "to theirs. Empty: those routes answer 503 'token2wav backend not configured' unless "
                                "code attaches app.state.token2wav.")
    token2wav_prompts: str = option("", "A folder of prompt-speaker audio files (.wav/.flac/.ogg, >= 16 kHz); the "
                                        "token2wav_asr routes send each item one drawn at random, as CosyVoice2's GRPO "
                                        "recipe does (its token2wav needs a speaker prompt). Empty: no prompt is sent.")
    token2wav_asr_error_unit: str = option("word", "What the token2wav_asr routes' error rate counts when a request does not "
                                                   "say: word, character, or pinyin (CosyVoice2's GRPO recipe, whose "
                                                   "client sends no parameters, scores Mandarin in pinyin).")
    token2wav_asr_language: str = option("", "Language of token2wav_asr items that give none (ISO 639-1, e.g. zh for "
                                             "the recipe); empty: the intelligibility scorer's default.")
    token2wav_prompt_seed: int = option(-1, "Seed of the prompt-speaker draws; -1 seeds from the OS (the recipe's "
                                            "random.randint).")
    request_timeout_s: float = option(30.0, "Deadline of one scorer call, retries included; past it the reply is 504.")
    max_attempts: int = option(3, "Attempts per scorer call on UNAVAILABLE / RESOURCE_EXHAUSTED (1 turns retries off).")
    scorer_token: str = option("", "Bearer token sent to the scorers (one of their auth tokens); empty: the SDK's "
                                   "SPEECHRL_CLIENT_TOKEN / SPEECHRL_CLIENT_TOKEN_FILE if set, else none.")
    scorer_tls_root_cert: str = option("", "PEM CA file of the scorers' TLS certificates; set, scorer calls use TLS.")
    scorer_tls_client_cert: str = option("", "PEM certificate the gateway presents to scorers that require mutual TLS.")
    scorer_tls_client_key: str = option("", "PEM private key of scorer_tls_client_cert.")
    health_timeout_s: float = option(1.0, "How long /readyz waits for each scorer's health answer.")
    log_level: str = option("info", "uvicorn log level: critical, error, warning, info, debug.")
    grace_seconds: float = option(10.0, "On SIGTERM, how long in-flight requests may finish.")
    # Trainer protocol front-ends: OpenRLHF's remote reward model (/v1/openrlhf) and KServe v2 (/v2).
    max_inflight_requests: int = option(512, "Most requests answered at once on the OpenRLHF, slime and /v2 infer routes; "
                                             "past it they get 429 with Retry-After (OpenRLHF sends one request per "
                                             "sample, all at once).")
    adapter_failure_reward: float = option(0.0, "Reward that the OpenRLHF, slime and /v2 routes give an item that could not "
                                                "be scored (their protocols have no null); flagged and logged.")
    adapter_scorer_errors: str = option("reward", "When a scorer call fails as a whole on the OpenRLHF, slime and /v2 routes: "
                                                  "reward (answer 200 with adapter_failure_reward per item) or http "
                                                  "(answer 429/503/504 so the trainer's own retry applies).")
    # The dashboard (/ui, routes/dashboard.py): what it watches besides the services above.
    encoder: str = option(f"127.0.0.1:{DEFAULT_PORTS['encoder']}", "Audio encoder endpoints, for the dashboard's "
                                                                   "service panel only (status, never called); empty: "
                                                                   "not shown.")
    rollout: str = option(f"127.0.0.1:{DEFAULT_PORTS['rollout']}", "Rollout generator endpoints, for the dashboard's "
                                                                   "service panel only; empty: not shown.")
    trainer: str = option(f"http://127.0.0.1:{DEFAULT_PORTS['trainer']}",
                          "Base URL of the trainer's job API; the dashboard lists, plots and cancels its jobs through "
                          "the gateway (sending scorer_token, or the SDK's token variables). Empty: no jobs panel.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis of the GPU lease, for the dashboard's lease timeline "
                                                        "and device-memory ledger (read only); empty: no lease panel.")
    service_metrics: str = option("", "Prometheus /metrics of the services, as name=host:port pairs separated by commas "
                                      "(docker-compose.yml: each service's :9464); the dashboard's latency, batch and "
                                      "queue columns come from them. Empty: throughput only, from GetServiceStatus.")
    openrlhf_scorer: str = option("rules", "Scorer of POST /v1/openrlhf/reward and /v1/slime/reward: rules (ASR text) or token2wav_asr (TTS "
                                           "speech tokens, needs a token2wav backend).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (1 turns retries off), got {self.max_attempts}")
        if self.max_inflight_requests < 1:
            raise ValueError(f"max_inflight_requests must be >= 1, got {self.max_inflight_requests}")
        if not math.isfinite(self.adapter_failure_reward):
            raise ValueError(f"adapter_failure_reward must be a finite number (JSON has no NaN), got {self.adapter_failure_reward}")
        if self.adapter_scorer_errors not in ("reward", "http"):
            raise ValueError(f"adapter_scorer_errors must be reward or http, got {self.adapter_scorer_errors!r}")
        if bool(self.scorer_tls_client_cert) != bool(self.scorer_tls_client_key):
            raise ValueError("mutual TLS to the scorers needs both scorer_tls_client_cert and scorer_tls_client_key")
        if self.token2wav_asr_error_unit not in ERROR_UNITS:
            raise ValueError(f"token2wav_asr_error_unit must be one of {ERROR_UNITS}, got {self.token2wav_asr_error_unit!r}")
        if self.openrlhf_scorer not in ("rules", "token2wav_asr"):
            raise ValueError(f"openrlhf_scorer must be rules or token2wav_asr, got {self.openrlhf_scorer!r}")
        for name in (*BACKENDS, *WATCHED):
            if getattr(self, name).strip():
                parse_endpoints(getattr(self, name))
        if self.trainer and not self.trainer.startswith(("http://", "https://")):
            raise ValueError(f"trainer must be an http:// or https:// URL (or empty), got {self.trainer!r}")
        self.metrics_endpoints()  # checks the pairs

    def endpoints(self, scorer: str) -> tuple[str, ...]:
        """The endpoints of a scorer; empty when it is turned off.

        >>> GatewayConfig(rules="a:1, b:2", speaker="").endpoints("rules"), GatewayConfig(speaker="").endpoints("speaker")
        (('a:1', 'b:2'), ())
        """
        value = getattr(self, scorer)
        return parse_endpoints(value) if value.strip() else ()

    def metrics_endpoints(self) -> dict[str, str]:
        """service_metrics as {service: host:port}.

        >>> GatewayConfig(service_metrics="rules=rules:9464, encoder=encoder:9464").metrics_endpoints()
        {'rules': 'rules:9464', 'encoder': 'encoder:9464'}
        """
        pairs = {}
        for pair in (p.strip() for p in self.service_metrics.split(",") if p.strip()):
            name, sep, address = (part.strip() for part in pair.partition("="))
            if not sep or name not in (*BACKENDS, *WATCHED) or ":" not in address:
                raise ValueError(f"service_metrics: expected service=host:port with a service of "
                                 f"{', '.join((*BACKENDS, *WATCHED))}, got {pair!r}")
            pairs[name] = address
        return pairs
