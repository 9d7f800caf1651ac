"""Health probe for containers: exit 0 when a service is healthy, 1 when not.

    python -m speechrl.services.healthcheck 127.0.0.1:50053            # grpc.health.v1 SERVING
    python -m speechrl.services.healthcheck http://127.0.0.1:8000/readyz  # HTTP 200

docker-compose.yml's health checks run it (it imports grpc but never torch, so a check costs a
fraction of a second); Kubernetes uses its native `grpc:` and `httpGet:` probes instead, which
ask the same questions without a binary in the image. It replaces the downloaded
grpc_health_probe binary, which these images do not carry.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def grpc_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The health status name of service at address (e.g. SERVING), or the gRPC error code's name.

    >>> from speechrl.services.ports import free_port
    >>> grpc_status(f"127.0.0.1:{free_port()}", timeout=0.5)
    'UNAVAILABLE'
    """
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return code.name if code is not None else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def http_status(url: str, timeout: float = 2.0) -> str:
    """'200' when url answers 200, else the status code or the connection error."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return str(reply.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return f"unreachable ({exc})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speechrl.services.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="HOST:PORT of a gRPC server, or an http(s):// URL")
    parser.add_argument("--service", default="", help="gRPC service name to ask about; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if args.target.startswith(("http://", "https://")):
        status, ok = http_status(args.target, args.timeout), "200"
    else:
        status, ok = grpc_status(args.target, args.service, args.timeout), "SERVING"
    print(f"{args.target}: {status}")
    sys.exit(0 if status == ok else 1)


if __name__ == "__main__":
    main()
