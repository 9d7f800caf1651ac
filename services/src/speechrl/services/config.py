"""Configuration: one dataclass per service, job or algorithm, whose field help is the only documentation.

Each field becomes a flag (`--max-batch-size`) and an environment variable
(`SPEECHRL_<SERVICE>_MAX_BATCH_SIZE`); a flag beats the environment, which beats the default. A job
file's mapping becomes the same dataclasses through `from_mapping`, nested sections included
(`grpo: {kl_beta: 0.05}`), every error naming its key. Defaults work on a CPU laptop; GPU settings
are given in each field's help. This module is the one place that turns flags, variables and
mappings into configs: the services, the gateway, the trainer service and the training jobs all
use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A documented config field (a list, dict or set default is copied per instance)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a Literal field type (X for `X | None`), else None."""
    kind = _unwrap_optional(kind)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """ValueError naming the field, the value and the allowed ones unless value is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_choices(config: Any) -> None:
    """check_choice for every Literal-typed field of a config dataclass (call it from __post_init__)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        allowed = choices(hints[f.name])
        value = getattr(config, f.name)
        if allowed is not None and not (value is None and _is_optional(hints[f.name])):
            check_choice(f.name, value, allowed)


@dataclass
class ListenerConfig:
    """What every process that listens shares (gRPC services, the gateway, the trainer's job API):
    its address, the bearer tokens it accepts and its log format."""

    host: str = option("127.0.0.1", "Address to listen on; 0.0.0.0 in containers.")
    port: int = option(0, "Port to listen on; 0 picks the service's default port.")
    auth_tokens: str = option("", "Comma-separated bearer tokens accepted (gRPC `authorization` metadata, HTTP "
                                  "`Authorization: Bearer`); with auth_token_file empty too, no token is needed (the "
                                  "laptop default). Health checks, /metrics and the HTTP docs stay open. Prefer "
                                  "auth_token_file or a Secret: flags show in `ps`.")
    auth_token_file: str = option("", "File of accepted bearer tokens, one per line (a mounted Secret); re-read when "
                                      "it changes and on SIGHUP. Missing or empty: no token is accepted.")
    log_format: Literal["text", "json"] = option("text", "Log lines as text or json (one object per line, with the "
                                                         "request id).")

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class ServerConfig(ListenerConfig):
    """Settings every gRPC server shares."""

    max_batch_size: int = option(32, "Most items per model batch (dynamic batching); 1 turns batching off.")
    max_wait_ms: float = option(20.0, "Longest a batch waits for company once its first item is queued. It waits only "
                                      "while more items are coming: while smaller than the previous batch (callers "
                                      "served together come back together), or while separate calls keep arriving "
                                      "less than 2 ms apart (a burst); a lone client, or one call's items, gets no "
                                      "added latency. 0: run with whatever is queued.")
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
    tls_cert_file: str = option("", "PEM certificate chain of this server; with tls_key_file, serve TLS instead of "
                                    "plaintext.")
    tls_key_file: str = option("", "PEM private key of tls_cert_file.")
    tls_client_ca_file: str = option("", "PEM CA bundle of client certificates; set, it turns on mutual TLS: clients "
                                         "without a certificate it signed are refused.")

    def __post_init__(self) -> None:
        super().__post_init__()
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


def env_name(service: str, name: str) -> str:
    """The environment variable of a field, e.g. SPEECHRL_INTELLIGIBILITY_MAX_BATCH_SIZE."""
    return f"SPEECHRL_{service.upper()}_{name.upper()}"


def _is_optional(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)


def _unwrap_optional(kind: Any) -> Any:
    """X for `X | None`."""
    if isinstance(kind, types.UnionType):
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def _is_config(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _pairs(items: Sequence[str]) -> dict[str, float]:
    """`wer=1.0 hallucination=0.5` (flag words, or one comma-separated variable) -> {"wer": 1.0, ...}."""
    weights = {}
    for pair in items:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected name=value, got {pair!r}")
        weights[name.strip()] = float(value)
    return weights


def _convert(kind: Any, raw: str) -> Any:
    """A variable's text as the field's type."""
    kind = _unwrap_optional(kind)
    origin = typing.get_origin(kind)
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if origin is Literal:
        return raw
    if origin is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if origin is dict:
        return _pairs([part for part in raw.split(",") if part.strip()])
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass cls (`--kl-beta 0.05`, `--lora/--no-lora`, `--log-format
    {text,json}`, `--lora-target-modules q_proj v_proj`, `--reward-weights wer=1 keyword=0.5`).

    Every flag defaults to None, so `from_namespace` passes on only what was given. Nested config
    sections (a job's `grpo`) have no flags: they come from the job file.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _unwrap_optional(hints[f.name])
        if _is_config(kind):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif origin is Literal:
            parser.add_argument(flag, dest=f.name, default=None, choices=typing.get_args(kind), help=help_text)
        elif origin is tuple:
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", metavar="NAME", help=help_text)
        elif origin is dict:
            parser.add_argument(flag, dest=f.name, default=None, nargs="+", metavar="NAME=VALUE", type=str,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=kind, metavar=f.name.upper(), help=help_text)


def from_namespace(cls: type[ConfigT], service: str, args: argparse.Namespace | None = None,
                   environ: Mapping[str, str] | None = None, base: Mapping[str, Any] | None = None) -> ConfigT:
    """Build cls from parsed flags, then SPEECHRL_<SERVICE>_* variables, then `base` (e.g. a file's
    mapping), then defaults.

    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, ListenerConfig)
    >>> config = from_namespace(ListenerConfig, "demo", parser.parse_args(["--log-format", "json"]),
    ...                         {"SPEECHRL_DEMO_PORT": "8000"}, base={"host": "0.0.0.0"})
    >>> config.host, config.port, config.log_format
    ('0.0.0.0', 8000, 'json')
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(base or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag_value = getattr(args, f.name, None) if args is not None else None
        if flag_value is not None:
            is_dict = typing.get_origin(_unwrap_optional(hints[f.name])) is dict
            values[f.name] = _pairs(flag_value) if is_dict else flag_value
        elif env_name(service, f.name) in env:
            raw = env[env_name(service, f.name)]
            try:
                values[f.name] = _convert(hints[f.name], raw)
            except ValueError as exc:
                raise ValueError(f"{env_name(service, f.name)}={raw!r}: {exc}") from None
    return from_mapping(cls, values)


def from_mapping(cls: type[ConfigT], values: Mapping[str, Any], where: str = "") -> ConfigT:
    """cls from a mapping (a YAML / JSON job file, a section of one), nested config sections built too.

    An unknown key, a section that is not a mapping and a broken invariant are ValueErrors that name
    the key's path (`grpo.kl_beta`), so a job file is checked whole when it is read.

    >>> from_mapping(ListenerConfig, {"port": 8000}).port
    8000
    >>> from_mapping(ListenerConfig, {"prot": 8000}, where="listen")
    Traceback (most recent call last):
    ...
    ValueError: listen.prot: not a field of ListenerConfig; known: auth_token_file, auth_tokens, host, log_format, port
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{where or 'the config'}: expected a mapping of settings, got {type(values).__name__}")
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{', '.join(prefix + name for name in unknown)}: not a field of {cls.__name__}; known: "
                         f"{', '.join(sorted(known))}")
    built = {name: from_mapping(hints[name], value, prefix + name)
             if _is_config(hints[name]) and isinstance(value, Mapping) else value for name, value in values.items()}
    try:
        return cls(**built)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def parse_config(cls: type[ConfigT], service: str, argv: Sequence[str] | None = None,
                 description: str = "", prog: str = "") -> ConfigT:
    """Parse argv (flags) and the SPEECHRL_<SERVICE>_* environment into the config dataclass cls; prog
    names the command in --help (default `speechrl serve SERVICE`)."""
    parser = argparse.ArgumentParser(prog=prog or f"speechrl serve {service}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    return from_namespace(cls, service, parser.parse_args(argv))
