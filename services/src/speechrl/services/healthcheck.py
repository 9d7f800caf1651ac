"""Health probe for containers: exit 0 when a service is healthy, 1 when not.

    python -m speechrl.services.healthcheck 127.0.0.1:50053            # grpc.health.v1 SERVING
    python -m speechrl.services.healthcheck http://127.0.0.1:8000/readyz  # HTTP 200

docker-compose.yml's health checks run it (it imports grpc but never torch, so a check costs a
fraction of a second); Kubernetes uses its native `grpc:` and `httpGet:` probes instead, which
ask the same questions without a binary in the image. It replaces the downloaded
grpc_health_probe binary, which these images do not carry.

A server that serves TLS is checked over TLS, with the settings of the container's own service
(SPEECHRL_<SERVICE>_TLS_*; kubelet's native gRPC probe cannot do TLS, so k8s/components/tls runs
this module as an exec probe instead):

- the CA that verifies the server: --tls-ca, else SPEECHRL_CLIENT_TLS_ROOT_CERT (the CA this pod's
  clients trust), else the service's tls_client_ca_file (one CA signs a deployment's certificates),
  else the service's own certificate file (a trust anchor that pins exactly the certificate the
  server is configured with, so one-way TLS needs no CA in the container);
- for mutual TLS (tls_client_ca_file set) a client certificate: --tls-cert/--tls-key, else
  SPEECHRL_CLIENT_TLS_CLIENT_CERT/_KEY, else the service's own certificate and key (which must then
  allow client authentication: no extendedKeyUsage, or one with clientAuth);
- the name checked against the certificate: --tls-server-name, else the target's host.

    python -m speechrl.services.healthcheck 127.0.0.1:50053 --tls-server-name rules
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from speechrl.client import tls_credentials


@dataclass(frozen=True)
class TlsSettings:
    """How the probe speaks TLS: PEM file paths (None: not used) and the name the certificate must hold."""

    root_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return tls_credentials(self.root_cert, self.client_cert, self.client_key)


def tls_from_env(environ: Mapping[str, str] | None = None, service: str = "") -> TlsSettings | None:
    """The TLS settings of the container's service (SPEECHRL_<SERVICE>_TLS_*); None when it serves plaintext.

    The service is the one whose tls_cert_file is set, or `service` where several are.

    >>> tls_from_env({"SPEECHRL_RULES_TLS_CERT_FILE": "/tls/tls.crt", "SPEECHRL_RULES_TLS_CLIENT_CA_FILE": "/tls/ca.crt",
    ...               "SPEECHRL_RULES_TLS_KEY_FILE": "/tls/tls.key"}).client_key
    '/tls/tls.key'
    >>> tls_from_env({}) is None
    True
    """
    env = os.environ if environ is None else environ
    serving = sorted(m.group(1) for k, v in env.items() if v and (m := re.fullmatch(r"SPEECHRL_(\w+)_TLS_CERT_FILE", k)))
    if service:
        serving = [s for s in serving if s == service.upper()]
    if not serving:
        return None
    if len(serving) > 1:
        raise ValueError(f"TLS settings of several services in the environment ({', '.join(serving)}): "
                         "pass --env-service NAME")
    prefix = f"SPEECHRL_{serving[0]}_"
    cert, key, client_ca = (env.get(prefix + n) or None for n in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE"))
    root = env.get("SPEECHRL_CLIENT_TLS_ROOT_CERT") or client_ca or cert
    if not client_ca:  # the server asks for no client certificate
        return TlsSettings(root_cert=root)
    client_cert = env.get("SPEECHRL_CLIENT_TLS_CLIENT_CERT") or None
    client_key = env.get("SPEECHRL_CLIENT_TLS_CLIENT_KEY") or None
    if client_cert is None:
        client_cert, client_key = cert, key
    return TlsSettings(root_cert=root, client_cert=client_cert, client_key=client_key)


def grpc_status(address: str, service: str = "", timeout: float = 2.0, tls: TlsSettings | None = None) -> str:
    """The health status name of service at address (e.g. SERVING), or the gRPC error code's name.

    With tls the check runs over TLS: a server whose certificate the CA does not verify answers
    UNAVAILABLE, as a server that is down does.

    >>> from speechrl.services.ports import free_port
    >>> grpc_status(f"127.0.0.1:{free_port()}", timeout=0.5)
    'UNAVAILABLE'
    """
    if tls is None:
        channel = grpc.insecure_channel(address)
    else:
        options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    with channel:
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


def probe_tls(args: argparse.Namespace) -> TlsSettings | None:
    """The environment's TLS settings with the flags laid over them; None for plaintext."""
    found = tls_from_env(service=args.env_service)
    if found is None and not (args.tls_ca or args.tls_cert):
        return None
    found = found or TlsSettings()
    client = (args.tls_cert, args.tls_key) if args.tls_cert else (found.client_cert, found.client_key)
    return TlsSettings(root_cert=args.tls_ca or found.root_cert, client_cert=client[0], client_key=client[1],
                       server_name=args.tls_server_name or None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speechrl.services.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="HOST:PORT of a gRPC server, or an http(s):// URL")
    parser.add_argument("--service", default="", help="gRPC service name to ask about; empty: the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    parser.add_argument("--env-service", default="", help="take TLS settings from SPEECHRL_<ENV_SERVICE>_TLS_* "
                                                          "(needed only where several services' are set)")
    parser.add_argument("--tls-ca", default="", help="PEM CA that verifies the server; turns TLS on")
    parser.add_argument("--tls-cert", default="", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", default="", help="name the server's certificate must hold "
                                                              "(default: the target's host)")
    args = parser.parse_args(argv)
    if args.target.startswith(("http://", "https://")):
        status, ok = http_status(args.target, args.timeout), "200"
    else:
        status, ok = grpc_status(args.target, args.service, args.timeout, probe_tls(args)), "SERVING"
    print(f"{args.target}: {status}")
    sys.exit(0 if status == ok else 1)


if __name__ == "__main__":
    main()
