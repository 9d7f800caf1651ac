"""`docker compose up` for real: the CPU stack of docker-compose.yml + docker-compose.cpu.yml, built
from docker/Dockerfile and started by the command the README gives, reached only through the ports
it publishes on 127.0.0.1. Scores speech through the gateway and over gRPC, trains two steps through
the trainer's job API, survives a hard kill of Redis and the crash of a scorer, and leaves nothing
behind after `down -v`.

Run by `make compose-test` (scripts/compose_test.sh), which starts a Docker engine, builds the
images and sets SPEECHRL_COMPOSE_TEST=1; without it these tests are skipped. The images come from
environment variables only (SPEECHRL_IMAGE_REPO, SPEECHRL_REDIS_IMAGE), the models folder and the
ports from the settings docs/deployment.md documents, and the project name keeps a user's own
`speechrl` project and its volumes out of reach."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from speechrl.client import IntelligibilityClient, RolloutClient
from speechrl.services.espeak import EspeakSynthesizer
from speechrl.services.healthcheck import grpc_status, http_status
from speechrl.services.intelligibility.server import IntelligibilityConfig
from speechrl.services.intelligibility.server import start as start_intelligibility
from speechrl.services.ports import free_port
from tests.support.servers import serve_in_thread
from tests.support.training import asr_warm_start

pytestmark = pytest.mark.skipif(os.environ.get("SPEECHRL_COMPOSE_TEST") != "1",
                                reason="needs a Docker engine and the built images: run `make compose-test`")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml"]  # as the README says
# scripts/compose_test.sh names the project (and takes it down, whatever happens to pytest).
PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "")
PUBLISHED = ("INTELLIGIBILITY", "SPEAKER", "RULES", "ENCODER", "ROLLOUT", "TOKEN2WAV", "GATEWAY", "TRAINER")
HTTP = ("GATEWAY", "TRAINER")
ALL_HEALTHY = {name: ("running", "healthy") for name in ("redis", "rules", "intelligibility", "speaker", "encoder",
                                                         "rollout", "token2wav", "gateway", "trainer")}
UTTERANCE = "the quick brown fox jumps over the lazy dog"
UP_TIMEOUT_S = 600


@dataclass
class ComposeStack:
    env: dict[str, str]
    ports: dict[str, int]

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([os.environ.get("DOCKER", "docker"), "compose", *COMPOSE_FILES, *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def docker(self, *args: str) -> str:
        return subprocess.run([os.environ.get("DOCKER", "docker"), *args], env=self.env, capture_output=True,
                              text=True, timeout=60, check=True).stdout.strip()

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def grpc(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def states(self) -> dict[str, tuple[str, str]]:
        """(state, health) of each service's container."""
        services = [json.loads(line) for line in self.compose("ps", "-a", "--format", "json").stdout.splitlines()]
        return {s["Service"]: (s["State"], s["Health"]) for s in services}

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def left_behind(self) -> dict[str, str]:
        """The project's containers, networks and volumes still on the engine, by kind."""
        label = f"label=com.docker.compose.project={PROJECT}"
        return {kind: found for kind, found in (
            ("containers", self.docker("ps", "-a", "-q", "--filter", label)),
            ("networks", self.docker("network", "ls", "-q", "--filter", label)),
            ("volumes", self.docker("volume", "ls", "-q", "--filter", label))) if found}


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder mounted at /models: a tiny warm-started LLM-ASR and its corpus, readable by uid 10001."""
    root = tmp_path_factory.mktemp("compose-models")
    policy, manifest = asr_warm_start(root)
    policy.rename(root / "asr-warmstart")
    manifest.parent.rename(root / "asr-data")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for parent in root.parents:  # pytest's temporary folders are private to their owner
        if parent == Path(parent.anchor) or parent.stat().st_mode & 0o005 == 0o005:
            break
        parent.chmod(parent.stat().st_mode | 0o005)
    return root


@pytest.fixture(scope="module")
def stack(models: Path) -> Iterator[ComposeStack]:
    assert PROJECT and PROJECT != "speechrl", "a project of its own, so down -v never takes a user's volumes"
    ports = {name: free_port() for name in PUBLISHED}
    env = {**os.environ,
           "COMPOSE_PROJECT_NAME": PROJECT,
           "COMPOSE_DISABLE_ENV_FILE": "1",                   # a developer's .env does not leak in
           "SPEECHRL_REDIS_IMAGE": os.environ.get("SPEECHRL_REDIS_IMAGE", "redis:7.4-bookworm"),
           "SPEECHRL_REDIS_PUBLISH_PORT": str(free_port()),
           **{f"SPEECHRL_{name}_PORT": str(port) for name, port in ports.items()},
           # What docs/deployment.md tells a user to set for a job: the encoder and rollout serve its policy.
           "SPEECHRL_MODELS_DIR": str(models),
           "SPEECHRL_ENCODER_BACKEND": "ct2-whisper",
           "SPEECHRL_ENCODER_MODEL_PATH": "/models/asr-warmstart/frontend",
           "SPEECHRL_ROLLOUT_MODEL_PATH": "/models/asr-warmstart"}
    stack = ComposeStack(env, ports)
    stack.compose("down", "-v", "--remove-orphans", check=False)  # what a killed earlier run left
    try:
        up = stack.compose("up", "-d", "--wait", timeout=UP_TIMEOUT_S, check=False)
        # Compose 2.40 can exit 0 when a dependency turned unhealthy (it skips the services that
        # wait on it), so the states are checked here as well as the exit status.
        if up.returncode != 0 or stack.states() != ALL_HEALTHY:
            pytest.fail(f"docker compose up -d --wait: exit {up.returncode}, states {stack.states()}\n"
                        f"{up.stderr[-3000:]}\n"
                        f"{stack.compose('logs', '--tail', '30', check=False).stdout[-6000:]}")
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)


def test_every_service_is_healthy_and_answers_on_its_published_port(stack: ComposeStack) -> None:
    assert stack.states() == ALL_HEALTHY
    answers = {name: http_status(f"{stack.url(name)}/readyz") if name in HTTP else grpc_status(stack.grpc(name))
               for name in PUBLISHED}
    assert answers == {name: "200" if name in HTTP else "SERVING" for name in PUBLISHED}


def test_scores_through_the_gateway_and_over_grpc_as_the_local_stack_does(
        stack: ComposeStack, speech: EspeakSynthesizer) -> None:
    wav = speech.wav(UTTERANCE)
    reply = httpx.post(f"{stack.url('GATEWAY')}/v1/intelligibility/score", timeout=60, json={
        "items": [{"audio_base64": base64.b64encode(wav).decode(), "reference_text": UTTERANCE}]})
    assert reply.status_code == 200, reply.text
    through_gateway = reply.json()["results"][0]["score"]
    with IntelligibilityClient(stack.grpc("INTELLIGIBILITY")) as scorer:
        over_grpc = scorer.score([wav], [UTTERANCE])[0].unwrap()
    with serve_in_thread(lambda: start_intelligibility(IntelligibilityConfig(port=free_port()))) as local, \
            IntelligibilityClient(f"127.0.0.1:{local.port}") as scorer:
        on_this_machine = scorer.score([wav], [UTTERANCE])[0].unwrap()
    assert over_grpc.transcript == on_this_machine.transcript == through_gateway["transcript"]
    assert over_grpc.wer == on_this_machine.wer == through_gateway["wer"]
    assert on_this_machine.wer < 0.5, on_this_machine.transcript  # real recognition, not an empty answer


def test_trains_two_steps_through_the_job_api(stack: ComposeStack) -> None:
    job = {"kind": "asr-grpo", "policy": "/models/asr-warmstart", "data": "/models/asr-data/manifest.jsonl",
           "steps": 2, "out_dir": "runs/compose-test", "encoder": "encoder:50054", "rollout": "rollout:50055",
           "rules": "rules:50053", "device": "cpu", "redis_url": "redis://redis:6379/0",
           "eval_split": "dev", "eval_size": 2, "eval_every": 2, "checkpoint_every": 1,
           "grpo": {"group_size": 3, "batch_size": 2, "mini_batch_size": 6, "learning_rate": 1e-3,
                    "max_completion_length": 32}}
    trainer = stack.url("TRAINER")
    submitted = httpx.post(f"{trainer}/v1/jobs", json=job, timeout=30)
    assert submitted.status_code == 201, submitted.text
    job_id = submitted.json()["id"]

    def finished() -> dict[str, Any] | None:
        status = httpx.get(f"{trainer}/v1/jobs/{job_id}", timeout=10).json()
        return status if status["status"] in ("succeeded", "failed", "cancelled") else None

    status = wait_for(finished, 600, f"job {job_id}")
    assert status["status"] == "succeeded", status
    metrics = httpx.get(f"{trainer}/v1/jobs/{job_id}/metrics", timeout=10).json()
    assert [m["step"] for m in metrics] == [1, 2]
    with RolloutClient(stack.grpc("ROLLOUT")) as rollout:  # the initial sync, then one per step
        assert rollout.get_service_status().policy_version == 3
    listing = stack.compose("exec", "-T", "trainer", "ls", "runs/compose-test/checkpoints").stdout.split()
    assert listing == ["step-000001", "step-000002"]


def test_a_hard_killed_redis_comes_back_with_the_job_on_its_append_only_file(stack: ComposeStack) -> None:
    trainer = stack.url("TRAINER")
    jobs_before = httpx.get(f"{trainer}/v1/jobs", timeout=10).json()
    assert jobs_before, "the training test ran first and left its job"
    time.sleep(1.5)  # appendfsync everysec: the last second of writes is what a hard kill may lose
    stack.compose("kill", "-s", "SIGKILL", "redis")  # no shutdown save: only the AOF on the volume is left
    stack.compose("up", "-d", "--wait", "redis", timeout=120)
    wait_for(lambda: httpx.get(f"{trainer}/readyz", timeout=5).status_code == 200, 60, "the trainer's readiness")
    jobs_after = httpx.get(f"{trainer}/v1/jobs", timeout=10).json()
    assert [(j["id"], j["status"], j["step"]) for j in jobs_after] == \
           [(j["id"], j["status"], j["step"]) for j in jobs_before]
    reply = httpx.post(f"{stack.url('GATEWAY')}/v1/rules/score", timeout=30, json={
        "items": [{"hypothesis": UTTERANCE, "reference": UTTERANCE}]})
    assert reply.status_code == 200, reply.text


def test_a_crashed_scorer_is_restarted_and_the_gateway_readiness_follows(stack: ComposeStack) -> None:
    gateway = stack.url("GATEWAY")
    container = stack.container("intelligibility")
    restarts = int(stack.docker("inspect", "-f", "{{.RestartCount}}", container))
    # SIGKILL the server process (the child of the container's init), as the OOM killer would: the
    # container exits 137 and its restart policy, not a person, brings it back.
    stack.compose("exec", "-T", "intelligibility", "sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)")
    not_ready = wait_for(lambda: (r := httpx.get(f"{gateway}/readyz", timeout=5)).status_code == 503 and r.json(),
                         60, "the gateway to report the scorer down", every=0.1)
    assert "intelligibility" in not_ready["detail"]
    wait_for(lambda: httpx.get(f"{gateway}/readyz", timeout=5).status_code == 200, 180, "the gateway ready again")
    assert int(stack.docker("inspect", "-f", "{{.RestartCount}}", container)) == restarts + 1
    wait_for(lambda: stack.docker("inspect", "-f", "{{.State.Health.Status}}", container) == "healthy", 120,
             "the restarted scorer's health check")


def test_down_v_leaves_no_containers_networks_or_volumes(stack: ComposeStack) -> None:
    stack.compose("down", "-v", "--remove-orphans")
    assert stack.left_behind() == {}
