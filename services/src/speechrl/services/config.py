"""Service configuration: one dataclass per service, whose field help is the only documentation.

Each field becomes a flag (`--max-batch-size`) and an environment variable
(`SPEECHRL_<SERVICE>_MAX_BATCH_SIZE`); a flag beats the environment, which beats the default.
Defaults work on a CPU laptop; GPU settings are given in each field's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A documented config field."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ServerConfig:
    """Settings every gRPC server shares."""

    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 in containers.")
    port: int = option(0, "Port to listen on; 0 picks the service's default port.")
    max_batch_size: int = option(32, "Most items per model batch (dynamic batching); 1 turns batching off.")
    max_wait_ms: float = option(5.0, "Longest a batch waits for company once its first item is queued. It waits only "
                                     "while smaller than the previous batch (callers served together come back "
                                     "together), never after a batch of one, so a lone client gets no added latency. "
                                     "0: run with whatever is queued. GPU: 5-20 to fill batches.")
    max_request_items: int = option(256, "Most items in one request; more is INVALID_ARGUMENT.")
    max_queue_items: int = option(4096, "Most items waiting for the model; beyond it requests get RESOURCE_EXHAUSTED.")
    max_audio_seconds: float = option(60.0, "Longest audio accepted per item; longer items get AUDIO_TOO_LONG.")
    max_message_mb: int = option(64, "Largest gRPC message in either direction, MiB (gRPC's default is 4).")
    device: str = option("cpu", "Device the model runs on: cpu, or cuda:N on a GPU box.")
    threads: int = option(0, "Intra-op threads of the model runtime; 0 means the number of cores.")
    metrics_port: int = option(0, "Serve Prometheus /metrics on this port; 0 turns it off.")
    grace_seconds: float = option(10.0, "On SIGTERM, how long in-flight requests may finish.")
    lease_device: str = option("", "Take this device's GPU lease around every batch (e.g. cuda:0) so services "
                                   "sharing a GPU take turns; empty: no lease (CPU, or a GPU of its own).")
    residency: str = option("keep", "Model between leased batches: keep (stay on device), offload (to CPU "
                                    "memory), sleep (backend sleep mode, vLLM). offload/sleep when sharing a GPU.")
    lease_priority: str = option("normal", "Lease priority class: high, normal or low (FIFO within a class).")
    lease_wait_seconds: float = option(120.0, "Longest wait for the lease before a batch fails UNAVAILABLE.")
    lease_ttl_ms: int = option(10_000, "Lease TTL: a dead holder blocks the device at most this long.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis of the GPU lease.")
    max_concurrent_requests: int = option(1024, "Most calls answered at once; past it calls get RESOURCE_EXHAUSTED with "
                                                "a retry-after-ms hint (health and reflection excepted). 0: no bound.")
    auth_tokens: str = option("", "Comma-separated bearer tokens accepted in `authorization` metadata; with "
                                  "auth_token_file empty too, no token is needed (the laptop default). Prefer "
                                  "auth_token_file or a Secret: flags show in `ps`.")
    auth_token_file: str = option("", "File of accepted bearer tokens, one per line (a mounted Secret); re-read when "
                                      "it changes and on SIGHUP. Missing or empty: no token is accepted.")
    tls_cert_file: str = option("", "PEM certificate chain of this server; with tls_key_file, serve TLS instead of "
                                    "plaintext.")
    tls_key_file: str = option("", "PEM private key of tls_cert_file.")
    tls_client_ca_file: str = option("", "PEM CA bundle of client certificates; set, it turns on mutual TLS: clients "
                                         "without a certificate it signed are refused.")
    log_format: str = option("text", "Log lines as text or json (one object per line, with the request id).")

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}; use 1 to turn batching off")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_audio_seconds <= 0:
            raise ValueError(f"max_audio_seconds must be > 0, got {self.max_audio_seconds}")
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"device must be cpu or cuda:N, got {self.device!r}")
        if self.residency not in ("keep", "offload", "sleep"):
            raise ValueError(f"residency must be keep, offload or sleep, got {self.residency!r}")
        if self.lease_priority not in ("high", "normal", "low"):
            raise ValueError(f"lease_priority must be high, normal or low, got {self.lease_priority!r}")
        if self.max_concurrent_requests < 0:
            raise ValueError(f"max_concurrent_requests must be >= 0 (0: no bound), got {self.max_concurrent_requests}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file (or neither for plaintext)")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")


def env_name(service: str, name: str) -> str:
    """The environment variable of a field, e.g. SPEECHRL_INTELLIGIBILITY_MAX_BATCH_SIZE."""
    return f"SPEECHRL_{service.upper()}_{name.upper()}"


def _convert(kind: Any, raw: str) -> Any:
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the config dataclass cls."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=f.metadata.get("help"))
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=kind, metavar=f.name.upper(),
                                help=f"{f.metadata.get('help', '')} (default: {f.default})")


def from_namespace(cls: type[ConfigT], service: str, args: argparse.Namespace | None = None,
                   environ: Mapping[str, str] | None = None) -> ConfigT:
    """Build cls from parsed flags, then SPEECHRL_<SERVICE>_* variables, then defaults."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            values[f.name] = flag_value
        elif env_name(service, f.name) in env:
            raw = env[env_name(service, f.name)]
            try:
                values[f.name] = _convert(hints[f.name], raw)
            except ValueError as exc:
                raise ValueError(f"{env_name(service, f.name)}={raw!r}: {exc}") from None
    return cls(**values)


def parse_config(cls: type[ConfigT], service: str, argv: Sequence[str] | None = None,
                 description: str = "") -> ConfigT:
    """Parse argv (flags) and the environment into the config dataclass cls."""
    parser = argparse.ArgumentParser(prog=f"speechrl serve {service}", description=description)
    add_arguments(parser, cls)
    return from_namespace(cls, service, parser.parse_args(argv))
