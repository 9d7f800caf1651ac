"""k8s/overlays/secure: the gpu overlay with k8s/components/auth-tokens and k8s/components/tls, rendered
by kubectl's kustomize, validated strictly, and checked against each service's Config: every service
reads the token file and its certificate from the mounted Secrets, the gateway and the trainer send
the token and present the certificate, and the gRPC probes run the TLS-aware health check (kubelet's
native gRPC probe speaks plaintext only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from speechrl.services import stack
from speechrl.services.cli import service_modules
from speechrl.services.healthcheck import TlsSettings, tls_from_env
from speechrl.services.ports import DEFAULT_PORTS
from tests.support.deployment import K8S_VERSION, ROOT, container_env, find, kustomize, run, service_config, tool

GRPC_SERVICES = tuple(n for n in service_modules() if n not in stack.HTTP_READY_PATHS)
TOKENS, TLS = "/etc/speechrl/tokens", "/etc/speechrl/tls"


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return kustomize(ROOT / "k8s" / "overlays" / "secure")


def mounts(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    """Mount path -> Secret name of a Deployment's container."""
    pod = find(docs, "Deployment", name)[0]["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    (container,) = pod["containers"]
    return {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}


def test_secure_overlay_validates_strictly(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    rendered = tmp_path / "secure.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    # The components also go on the cpu overlay, as docs/deployment.md shows.
    mine = tmp_path / "cpu-secure"
    mine.mkdir()
    k8s = os.path.relpath(ROOT / "k8s", mine)
    (mine / "kustomization.yaml").write_text(
        f"resources: [{k8s}/overlays/cpu]\ncomponents: [{k8s}/components/auth-tokens, {k8s}/components/tls]\n")
    cpu = tmp_path / "cpu-secure.yaml"
    cpu.write_text(yaml.safe_dump_all(kustomize(mine)))
    run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(rendered), str(cpu)])


def test_every_service_checks_tokens_and_serves_mutual_tls(docs: list[dict[str, Any]]) -> None:
    for name in service_modules():
        (container,) = find(docs, "Deployment", name)[0]["spec"]["template"]["spec"]["containers"]
        env = container_env(docs, container)
        config = service_config(name, env)  # every SPEECHRL_* name is a field (or an SDK setting)
        assert config.auth_token_file == f"{TOKENS}/tokens", name
        assert mounts(docs, name) == {TOKENS: "speechrl-tokens", TLS: "speechrl-tls"}, name
        if name in GRPC_SERVICES:
            assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
                f"{TLS}/tls.crt", f"{TLS}/tls.key", f"{TLS}/ca.crt"), name
            # What the exec probe's health check makes of this environment: mutual TLS with the pod's own pair.
            assert tls_from_env(env) == TlsSettings(f"{TLS}/ca.crt", f"{TLS}/tls.crt", f"{TLS}/tls.key"), name
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "grpc" not in container[probe], (name, probe)
                assert container[probe]["exec"]["command"] == [
                    "python", "-m", "speechrl.services.healthcheck", f"127.0.0.1:{DEFAULT_PORTS[name]}",
                    "--tls-server-name", name], (name, probe)
                assert container[probe]["timeoutSeconds"] >= 5
        else:  # HTTP services keep their httpGet probes
            assert container["readinessProbe"]["httpGet"]["path"] == stack.HTTP_READY_PATHS[name]
            assert env["SPEECHRL_CLIENT_TOKEN_FILE"] == f"{TOKENS}/tokens"  # the token it sends
    gateway = service_config("gateway", container_env(docs, find(docs, "Deployment", "gateway")[0]["spec"]["template"]
                                                       ["spec"]["containers"][0]))
    assert (gateway.scorer_tls_root_cert, gateway.scorer_tls_client_cert, gateway.scorer_tls_client_key) == (
        f"{TLS}/ca.crt", f"{TLS}/tls.crt", f"{TLS}/tls.key")
    trainer_env = container_env(docs, find(docs, "Deployment", "trainer")[0]["spec"]["template"]["spec"]["containers"][0])
    assert [trainer_env[f"SPEECHRL_CLIENT_TLS_{k}"] for k in ("ROOT_CERT", "CLIENT_CERT", "CLIENT_KEY")] == [
        f"{TLS}/ca.crt", f"{TLS}/tls.crt", f"{TLS}/tls.key"]
    assert not find(docs, "Secret", "speechrl-tokens") and not find(docs, "Secret", "speechrl-tls")  # never in git
