"""Authentication and transport security: bearer tokens on every gRPC service, the gateway and the
job API; health stays open; TLS and mutual TLS with certificates made here by the openssl CLI."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from speechrl.client import RuleRewardsClient, ServiceError
from speechrl.services.encoder.server import EncoderConfig
from speechrl.services.encoder.server import start as start_encoder
from speechrl.services.encoder.tiny import build_tiny_encoder
from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from speechrl.services.rollout.server import RolloutConfig
from speechrl.services.rollout.server import start as start_rollout
from speechrl.services.rollout.tiny import build_tiny_qwen2
from speechrl.services.rules.server import RulesConfig
from speechrl.services.rules.server import start as start_rules
from speechrl.services.server import RunningServer
from speechrl.services.speaker.server import SpeakerConfig
from speechrl.services.speaker.server import start as start_speaker
from speechrl.trainer.jobs.service import TrainerConfig
from speechrl.trainer.jobs.service import create_app as create_trainer_app
from speechrl.v1 import (
    encoder_pb2,
    encoder_pb2_grpc,
    intelligibility_pb2,
    intelligibility_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    rule_rewards_pb2,
    rule_rewards_pb2_grpc,
    speaker_pb2,
    speaker_pb2_grpc,
)
from tests.support.servers import RedisServer, serve_in_thread

TOKEN = "s3cret-token"
ITEM = rule_rewards_pb2.RuleRewardItem(hypothesis="the cat sat", reference="the cat sat")


def call_empty(stub_class: type, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> Callable[[grpc.Channel], Any]:
    """A call of `method` with an empty (so cheap, INVALID_ARGUMENT once admitted) request."""

    def run(channel: grpc.Channel) -> Any:
        reply = getattr(stub_class(channel), method)(request, metadata=metadata, timeout=30)
        return list(reply) if hasattr(reply, "__iter__") and not hasattr(reply, "ListFields") else reply

    return run


ServiceCase = tuple[Callable[[Path], Callable[[], Awaitable[RunningServer]]], type, str, Any]

SERVICES: dict[str, ServiceCase] = {
    "rules": (lambda _: lambda: start_rules(RulesConfig(port=free_port(), auth_tokens=TOKEN)),
              rule_rewards_pb2_grpc.RuleRewardsStub, "ScoreRules", rule_rewards_pb2.ScoreRulesRequest()),
    "intelligibility": (lambda _: lambda: start_intelligibility(IntelligibilityConfig(port=free_port(), auth_tokens=TOKEN)),
                        intelligibility_pb2_grpc.IntelligibilityScorerStub, "ScoreIntelligibility",
                        intelligibility_pb2.ScoreIntelligibilityRequest()),
    "speaker": (lambda _: lambda: start_speaker(SpeakerConfig(port=free_port(), auth_tokens=TOKEN)),
                speaker_pb2_grpc.SpeakerSimilarityScorerStub, "ScoreSpeakerSimilarity",
                speaker_pb2.ScoreSpeakerSimilarityRequest()),
    "encoder": (lambda tmp: lambda: start_encoder(EncoderConfig(
        port=free_port(), auth_tokens=TOKEN,
        model_path=str(build_tiny_encoder(tmp / "encoder", 64, downsample_rate=2, encoder_layers=1)))),
        encoder_pb2_grpc.AudioEncoderStub, "EncodeAudio", encoder_pb2.EncodeAudioRequest()),
    "rollout": (lambda tmp: lambda: start_rollout(RolloutConfig(
        port=free_port(), auth_tokens=TOKEN, threads=1,
        model_path=str(build_tiny_qwen2(tmp / "qwen", speech_tokens=8)))),
        rollout_pb2_grpc.RolloutGeneratorStub, "Generate", rollout_pb2.GenerateRequest()),
}


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_grpc_service_refuses_missing_and_wrong_tokens(service: str, tmp_path: Path) -> None:
    build, stub_class, method, request = SERVICES[service]
    with serve_in_thread(build(tmp_path)) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        for metadata, why in [((), "no authorization metadata"), ((("authorization", "Bearer nope"),), "wrong token"),
                              ((("authorization", TOKEN),), "not 'Bearer <token>'")]:
            with pytest.raises(grpc.RpcError) as info:
                call_empty(stub_class, method, request, metadata)(channel)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, service
            assert why in info.value.details()
        # The right token is admitted: the empty request reaches the servicer, which names the field.
        with pytest.raises(grpc.RpcError) as info:
            call_empty(stub_class, method, request, (("authorization", f"Bearer {TOKEN}"),))(channel)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, service
        # Health checks need no token (probes, load balancers).
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_sdk_token_scores_and_the_refusal_is_logged_without_payload(caplog: pytest.LogCaptureFixture) -> None:
    config = RulesConfig(port=free_port(), auth_tokens=f"other, {TOKEN}")
    with serve_in_thread(lambda: start_rules(config)) as running:
        endpoint = f"127.0.0.1:{running.port}"
        with RuleRewardsClient(endpoint, token=TOKEN) as client:
            assert client.score(["the cat sat"], ["the cat sat"])[0].score.wer == 0.0
        with RuleRewardsClient(endpoint, token="wrong") as client, pytest.raises(ServiceError) as info:
            client.score(["PRIVATE-HYPOTHESIS"], ["PRIVATE-REFERENCE"])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.attempts == 1  # not retried
    refusals = [r.getMessage() for r in caplog.records if "unauthenticated" in r.getMessage()]
    assert refusals and "/speechrl.v1.RuleRewards/ScoreRules" in refusals[-1] and "wrong token" in refusals[-1]
    assert "127.0.0.1" in refusals[-1]
    assert not any("PRIVATE" in r.getMessage() for r in caplog.records)


def test_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotated monthly\nfirst\n")
    config = RulesConfig(port=free_port(), auth_token_file=str(tokens))
    with serve_in_thread(lambda: start_rules(config)) as running, \
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)

        def code(token: str) -> grpc.StatusCode:
            try:
                stub.ScoreRules(rule_rewards_pb2.ScoreRulesRequest(items=[ITEM]),
                                metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        assert code("first") == grpc.StatusCode.OK and code("second") == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(0.05)
        tokens.write_text("second\n")
        deadline = time.monotonic() + 5
        while code("second") != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new token file was not picked up"
            time.sleep(0.2)
        assert code("first") == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def rules_with_token() -> Iterator[str]:
    config = RulesConfig(port=free_port(), auth_tokens=TOKEN)
    with serve_in_thread(lambda: start_rules(config)) as running:
        yield f"127.0.0.1:{running.port}"


def test_gateway_requires_its_token_and_passes_the_scorer_token(rules_with_token: str) -> None:
    body = {"items": [{"hypothesis": "the cat sat", "reference": "the cat sat"}]}
    config = GatewayConfig(rules=rules_with_token, intelligibility="", speaker="", auth_tokens="gateway-token",
                           scorer_token=TOKEN, max_attempts=1)
    with TestClient(create_app(config)) as client:
        missing = client.post("/v1/rules/score", json=body)
        wrong = client.post("/v1/rules/score", json=body, headers={"Authorization": "Bearer nope"})
        right = client.post("/v1/rules/score", json=body, headers={"Authorization": "Bearer gateway-token"})
        open_paths = [client.get(path).status_code for path in ("/healthz", "/readyz", "/metrics", "/docs")]
    for reply in (missing, wrong):
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert right.status_code == 200 and right.json()["results"][0]["score"]["wer"] == 0.0
    assert open_paths == [200, 200, 200, 200]
    # Without the scorer token the scorer refuses the gateway: not a 200 nor a retry storm.
    no_scorer_token = GatewayConfig(rules=rules_with_token, intelligibility="", speaker="", max_attempts=1)
    with TestClient(create_app(no_scorer_token)) as client:
        assert client.post("/v1/rules/score", json=body).status_code >= 500


def test_trainer_job_api_requires_its_token(redis_server: RedisServer) -> None:
    app = create_trainer_app(TrainerConfig(redis_url=redis_server.url, auth_tokens="trainer-token"), start_worker=False)
    with TestClient(app) as client:
        assert client.get("/v1/jobs").status_code == 401
        wrong = client.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        right = client.get("/v1/jobs", headers={"Authorization": "Bearer trainer-token"})
        open_paths = [client.get(path).status_code for path in ("/healthz", "/readyz", "/docs")]
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert right.status_code == 200 and right.json() == []
    assert open_paths == [200, 200, 200]


# ---- TLS


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("certs")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=speechrl-test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=speechrl-test-{name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


def score_over_tls(port: int, **tls: Any) -> float:
    with RuleRewardsClient(f"127.0.0.1:{port}", timeout_s=5, **tls) as client:
        return client.score(["the cat sat"], ["the cat sat"])[0].score.wer  # type: ignore[union-attr]


def test_tls_serves_a_client_that_trusts_the_ca(certs: Path) -> None:
    config = RulesConfig(port=free_port(), tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"))
    with serve_in_thread(lambda: start_rules(config)) as running:
        assert score_over_tls(running.port, tls_root_cert=str(certs / "ca.pem")) == 0.0
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, pytest.raises(grpc.RpcError):
            rule_rewards_pb2_grpc.RuleRewardsStub(channel).ScoreRules(
                rule_rewards_pb2.ScoreRulesRequest(items=[ITEM]), timeout=3)


def test_mutual_tls_refuses_a_client_without_a_certificate(certs: Path) -> None:
    config = RulesConfig(port=free_port(), tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                         tls_client_ca_file=str(certs / "ca.pem"), auth_tokens=TOKEN)
    with serve_in_thread(lambda: start_rules(config)) as running:
        assert score_over_tls(running.port, tls_root_cert=(certs / "ca.pem").read_bytes(), token=TOKEN,
                              tls_client_cert=str(certs / "client.pem"), tls_client_key=str(certs / "client.key")) == 0.0
        with pytest.raises(ServiceError) as info:
            score_over_tls(running.port, tls_root_cert=str(certs / "ca.pem"), token=TOKEN)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_config_refuses_half_a_tls_setting() -> None:
    with pytest.raises(ValueError, match="tls_key_file"):
        RulesConfig(tls_cert_file="server.pem")
    with pytest.raises(ValueError, match="mutual TLS"):
        RulesConfig(tls_client_ca_file="ca.pem")



# ---- the health check over TLS (what k8s/components/tls runs as an exec probe) and the SDK's env settings


def healthcheck(port: int, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    """`python -m speechrl.services.healthcheck` as a probe runs it, with only the container's SPEECHRL_* env."""
    import os
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHRL_")}
    return subprocess.run([sys.executable, "-m", "speechrl.services.healthcheck", f"127.0.0.1:{port}", *flags],
                          env=base | env, capture_output=True, text=True, timeout=60)


def test_healthcheck_speaks_the_services_own_tls(certs: Path, tmp_path: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.pem", "-days", "2",
            "-subj", "/CN=some-other-ca", cwd=tmp_path)
    served = {"tls_cert_file": str(certs / "server.pem"), "tls_key_file": str(certs / "server.key"),
              "tls_client_ca_file": str(certs / "ca.pem")}
    env = {f"SPEECHRL_RULES_{k.upper()}": v for k, v in served.items()}
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port(), auth_tokens=TOKEN, **served))) as running:
        mutual = healthcheck(running.port, env)  # CA from tls_client_ca_file, the server's own pair as client cert
        named = healthcheck(running.port, env, "--tls-server-name", "localhost")
        wrong_ca = healthcheck(running.port, env, "--tls-ca", str(tmp_path / "other.pem"))
        wrong_name = healthcheck(running.port, env, "--tls-server-name", "rules.example")
        plaintext = healthcheck(running.port, {})
    assert (mutual.returncode, named.returncode) == (0, 0), (mutual.stdout, mutual.stderr)
    assert mutual.stdout.strip().endswith("SERVING")
    for failed in (wrong_ca, wrong_name, plaintext):
        assert failed.returncode == 1 and "UNAVAILABLE" in failed.stdout, failed.stdout + failed.stderr
    # TLS without client certificates: the CA this pod's clients trust (SPEECHRL_CLIENT_TLS_ROOT_CERT), or
    # no CA at all: the server's own certificate file as the trust anchor pins exactly that certificate.
    one_way = {k: v for k, v in served.items() if k != "tls_client_ca_file"}
    with serve_in_thread(lambda: start_rules(RulesConfig(port=free_port(), **one_way))) as running:
        env = {f"SPEECHRL_RULES_{k.upper()}": v for k, v in one_way.items()}
        by_ca = healthcheck(running.port, env | {"SPEECHRL_CLIENT_TLS_ROOT_CERT": str(certs / "ca.pem")})
        pinned = healthcheck(running.port, env)
        other_ca = healthcheck(running.port, env | {"SPEECHRL_CLIENT_TLS_ROOT_CERT": str(tmp_path / "other.pem")})
    assert (by_ca.returncode, pinned.returncode, other_ca.returncode) == (0, 0, 1)


def test_sdk_clients_take_token_and_tls_from_the_environment(certs: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# first line that is a token is sent\n{TOKEN}\nold-token\n")
    config = RulesConfig(port=free_port(), tls_cert_file=str(certs / "server.pem"), tls_key_file=str(certs / "server.key"),
                         tls_client_ca_file=str(certs / "ca.pem"), auth_token_file=str(tokens))
    with serve_in_thread(lambda: start_rules(config)) as running:
        monkeypatch.setenv("SPEECHRL_CLIENT_TOKEN_FILE", str(tokens))
        monkeypatch.setenv("SPEECHRL_CLIENT_TLS_ROOT_CERT", str(certs / "ca.pem"))
        monkeypatch.setenv("SPEECHRL_CLIENT_TLS_CLIENT_CERT", str(certs / "client.pem"))
        monkeypatch.setenv("SPEECHRL_CLIENT_TLS_CLIENT_KEY", str(certs / "client.key"))
        assert score_over_tls(running.port) == 0.0  # nothing passed in code
        with pytest.raises(ServiceError) as info:
            score_over_tls(running.port, token="not-the-token")  # an argument wins over the environment
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    tokens.write_text("# no token yet\n")
    with pytest.raises(ValueError, match="holds no token"):
        RuleRewardsClient("127.0.0.1:1")
