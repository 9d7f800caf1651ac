"""Settings of the gateway: `speechrl serve gateway --flag` or SPEECHRL_GATEWAY_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from speechrl.client import parse_endpoints
from speechrl.services.config import option
from speechrl.services.ports import DEFAULT_PORTS

SERVICE = "gateway"
SCORERS = ("intelligibility", "speaker", "rules")


@dataclass
class GatewayConfig:
    """Settings of the REST gateway. Every scorer is a comma-separated list of host:port replicas."""

    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 in containers.")
    port: int = option(DEFAULT_PORTS["gateway"], "HTTP port.")
    intelligibility: str = option(f"127.0.0.1:{DEFAULT_PORTS['intelligibility']}",
                                  "Intelligibility scorer endpoints, e.g. 'a:50051,b:50051'; empty turns its routes off.")
    speaker: str = option(f"127.0.0.1:{DEFAULT_PORTS['speaker']}",
                          "Speaker-similarity scorer endpoints; empty turns its routes off.")
    rules: str = option(f"127.0.0.1:{DEFAULT_PORTS['rules']}", "Rule-reward service endpoints; empty turns its routes off.")
    request_timeout_s: float = option(30.0, "Deadline of one scorer call, retries included; past it the reply is 504.")
    max_attempts: int = option(3, "Attempts per scorer call on UNAVAILABLE / RESOURCE_EXHAUSTED (1 turns retries off).")
    scorer_token: str = option("", "Bearer token sent to the scorers; empty sends none.")
    health_timeout_s: float = option(1.0, "How long /readyz waits for each scorer's health answer.")
    log_level: str = option("info", "uvicorn log level: critical, error, warning, info, debug.")
    grace_seconds: float = option(10.0, "On SIGTERM, how long in-flight requests may finish.")

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (1 turns retries off), got {self.max_attempts}")
        for name in SCORERS:
            if getattr(self, name).strip():
                parse_endpoints(getattr(self, name))

    def endpoints(self, scorer: str) -> tuple[str, ...]:
        """The endpoints of a scorer; empty when it is turned off.

        >>> GatewayConfig(rules="a:1, b:2", speaker="").endpoints("rules"), GatewayConfig(speaker="").endpoints("speaker")
        (('a:1', 'b:2'), ())
        """
        value = getattr(self, scorer)
        return parse_endpoints(value) if value.strip() else ()
