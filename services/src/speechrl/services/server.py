"""Builds and runs a SpeechRL gRPC server: options, health, reflection, status, graceful drain.

A service module supplies its servicer and a status callback; this module does the rest the same
way for every service.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # set up at import time
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from speechrl.services import __version__, tracing
from speechrl.services.auth import TokenStore
from speechrl.services.config import ServerConfig, parse_config
from speechrl.services.interceptor import ServerInterceptor
from speechrl.services.logs import configure_logging
from speechrl.services.ports import port_holder
from speechrl.v1 import common_pb2, common_pb2_grpc

log = logging.getLogger(__name__)

ServerConfigT = TypeVar("ServerConfigT", bound=ServerConfig)


@dataclass
class ServiceSpec:
    """One gRPC service a server hosts: its full name and how to add its servicer."""

    full_name: str  # e.g. "speechrl.v1.IntelligibilityScorer"
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel options of every server."""
    max_bytes = config.max_message_mb * 1024 * 1024
    return [
        # Batches of long audio, and encoder outputs, outgrow gRPC's 4 MiB default.
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        # Trainers keep long-lived channels; allow their keepalive pings without GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Let clients see a dead peer within ~40 s instead of the kernel's TCP timeout.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Clients re-resolve a service name only when a connection ends: ending each one after
        # ~5 min (gRPC adds jitter; calls in flight finish) lets round_robin clients of a
        # Kubernetes headless Service find the pods a scale-up added.
        ("grpc.max_connection_age_ms", 300_000),
        # Bind the port alone: with gRPC's default SO_REUSEPORT a second server on the same port
        # starts "healthy" and takes a share of new connections (a stale scorer of an older version
        # answering part of a run's rewards), where it should fail at start.
        ("grpc.so_reuseport", 0),
    ]


class StatusServicer(common_pb2_grpc.ServiceStatusServicer):
    """Answers GetServiceStatus from a callback that fills in the model's state."""

    def __init__(self, describe: Callable[[], common_pb2.GetServiceStatusResponse]):
        self.describe = describe

    async def GetServiceStatus(self, request: common_pb2.GetServiceStatusRequest,
                               context: grpc.aio.ServicerContext) -> common_pb2.GetServiceStatusResponse:
        status = self.describe()
        status.version = __version__
        return status


def status_response(service: str, backend: str, model: str, config: ServerConfig,
                    batcher: Any) -> common_pb2.GetServiceStatusResponse:
    """The GetServiceStatus reply of a server with one model behind one DynamicBatcher."""
    guard = batcher.guard
    return common_pb2.GetServiceStatusResponse(
        service=service, backend=backend, model=model, device=config.device,
        residency=guard.residency if guard is not None else "resident",
        lease=guard.lease_state() if guard is not None else None,
        batching=common_pb2.BatchingConfig(max_batch_size=config.max_batch_size, max_wait_ms=int(config.max_wait_ms)),
        items_processed=batcher.items_processed, items_failed=batcher.items_failed,
        device_memory=guard.memory_state() if guard is not None else [])


class RunningServer:
    """A started server: its port, and how to stop it (draining in-flight calls)."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer: health_aio.HealthServicer,
                 names: Sequence[str], on_stop: Callable[[], None] | None, interceptor: ServerInterceptor):
        self.interceptor = interceptor
        self.server = server
        self.port = port
        self.health = health_servicer
        self.names = names
        self.on_stop = on_stop

    async def stop(self, grace_seconds: float) -> None:
        """Report NOT_SERVING, let in-flight calls finish for grace_seconds, then stop."""
        for name in ("", *self.names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_seconds)
        if self.on_stop is not None:
            self.on_stop()


def close_all(*parts: object) -> Callable[[], None]:
    """An on_stop that calls close() on each part that has one, in order: a batcher, then a backend that holds
    an engine (vLLM), which then frees its device memory and process-wide state now, not when it is collected."""

    def close() -> None:
        for part in parts:
            closer = getattr(part, "close", None)
            if closer is not None:
                closer()

    return close


async def start_server(config: ServerConfig, default_port: int, services: Sequence[ServiceSpec],
                       describe: Callable[[], common_pb2.GetServiceStatusResponse],
                       on_stop: Callable[[], None] | None = None) -> RunningServer:
    """Start a grpc.aio server hosting services plus health, reflection and ServiceStatus."""
    interceptor = ServerInterceptor(TokenStore(config.auth_tokens, config.auth_token_file),
                                    config.max_concurrent_requests)
    server = grpc.aio.server(options=grpc_options(config), interceptors=[interceptor])
    for spec in services:
        spec.add_to_server(spec.servicer, server)
    common_pb2_grpc.add_ServiceStatusServicer_to_server(StatusServicer(describe), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [spec.full_name for spec in services]
    reflection.enable_server_reflection(
        [*names, "speechrl.v1.ServiceStatus", health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port or default_port}"
    credentials = server_credentials(config)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc.aio raises "Failed to bind to address" where grpc returns 0
        port = 0
    if port == 0:
        wanted = config.port or default_port
        raise OSError(f"cannot listen on {address}: port {wanted} is taken by {port_holder(wanted)}; stop that "
                      "process or choose another --port")
    await server.start()
    for name in ("", *names, "speechrl.v1.ServiceStatus"):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if config.metrics_port:
        register_gpu_metrics()
        start_http_server(config.metrics_port, addr=config.host)
    log.info("serving %s on %s:%d (%s, %s)", ", ".join(names), config.host, port,
             "mutual TLS" if config.tls_client_ca_file else "TLS" if credentials else "plaintext",
             "bearer tokens" if interceptor.tokens.enabled else "no auth")
    return RunningServer(server, port, health_servicer, names, on_stop, interceptor)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files; None for plaintext.

    With tls_client_ca_file, clients must present a certificate signed by it (mutual TLS).
    """
    if not config.tls_cert_file:
        return None
    with open(config.tls_key_file, "rb") as f:
        key = f.read()
    with open(config.tls_cert_file, "rb") as f:
        chain = f.read()
    client_ca = None
    if config.tls_client_ca_file:
        with open(config.tls_client_ca_file, "rb") as f:
            client_ca = f.read()
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


_gpu_metrics_registered = False


def _read_float(read: Callable[[int], int], index: int) -> float:
    return float(read(index))


def register_gpu_metrics() -> None:
    """GPU memory gauges (allocated, reserved, total by device) when torch sees a CUDA device."""
    global _gpu_metrics_registered
    if _gpu_metrics_registered:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    from prometheus_client import Gauge

    def total(index: int) -> int:
        return int(torch.cuda.get_device_properties(index).total_memory)

    kinds: dict[str, Callable[[int], int]] = {"allocated": torch.cuda.memory_allocated,
                                              "reserved": torch.cuda.memory_reserved, "total": total}
    gauge = Gauge("speechrl_gpu_memory_bytes", "GPU memory of this process by device and kind "
                  "(allocated and reserved by torch's allocator; total of the device)", ["device", "kind"])
    for index in range(torch.cuda.device_count()):
        for kind, read in kinds.items():
            gauge.labels(f"cuda:{index}", kind).set_function(functools.partial(_read_float, read, index))
    _gpu_metrics_registered = True


async def serve_until_signalled(running: RunningServer, grace_seconds: float) -> None:
    """Block until SIGTERM/SIGINT, then drain and stop; SIGHUP re-reads the token file."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.interceptor.tokens.reload)
    await stop.wait()
    log.info("signal received: draining for up to %.0f s", grace_seconds)
    await running.stop(grace_seconds)


def configure_runtime(config: ServerConfig) -> None:
    """Logging (text or JSON lines, with request ids) and the torch thread count, before a model loads."""
    configure_logging(config.log_format)
    if config.threads <= 0:
        return  # nothing to set; and a service without a torch model (the rules) never pays torch's ~3 s import
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(config.threads)


def serve_main(config_class: type[ServerConfigT], service: str,
               start: Callable[[ServerConfigT], Awaitable[RunningServer]],
               argv: Sequence[str] | None, description: str) -> None:
    """The `main` of every gRPC service: flags and SPEECHRL_<SERVICE>_* variables, runtime settings,
    then serve until SIGTERM/SIGINT and drain."""
    config = parse_config(config_class, service, argv, description=description)
    configure_runtime(config)  # before the model loads: thread counts, logging
    tracing.setup(f"speechrl-{service}")  # with SPEECHRL_TRACING: spans name their service (OTEL_SERVICE_NAME wins)

    async def run() -> None:
        running = await start(config)
        await serve_until_signalled(running, config.grace_seconds)

    asyncio.run(run())
