"""Deployment, checked offline: docker-compose.yml (+ the CPU override), the k8s overlays and the image
against their schemas and against the local stack, then each compose service's command started here.

What is deployed is what is tested: the compose model comes from docker-compose v2's own `config`
(merge + .env interpolation), the manifests from kubectl's kustomize, validated by check-jsonschema
(compose spec) and kubernetes-validate --strict; the parity tests compare command, ports, health
checks and environment with `speechrl.services.stack` / `ports.py` / each service's Config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from speechrl.services import stack
from speechrl.services.cli import service_modules
from speechrl.services.healthcheck import grpc_status, http_status
from speechrl.services.ports import DEFAULT_PORTS, free_port
from tests.support.deployment import (
    K8S_VERSION,
    OVERLAYS,
    ROOT,
    assert_locked_down,
    compose_config,
    container_env,
    find,
    image_env,
    image_workdir,
    ingress_admits,
    kustomize,
    run,
    service_config,
    tool,
    without_merge_tags,
)
from tests.support.servers import RedisServer

SERVICES = tuple(service_modules())  # every `speechrl serve` service is deployed
GPU_SERVICES = ("intelligibility", "speaker", "encoder", "rollout", "token2wav", "trainer")  # reserve the GPU (gpu variants)
# Services whose Config takes the lease per batch; the trainer's jobs take theirs around each update (jobs/driver.py).
LEASED_SERVICES = ("intelligibility", "speaker", "encoder", "rollout", "token2wav")
# What the gateway calls: its readiness waits for each, and it renders speech tokens through token2wav.
GATEWAY_BACKENDS = ("intelligibility", "speaker", "rules", "token2wav")
STARTED_HERE = stack.STACK_SERVICES  # in `speechrl up`'s order
# The trainer's runs volume: its working directory (relative out_dir / sync_dir land on it), and
# read-only at the same path in the rollout service, which loads the weights a job syncs.
RUNS_READERS = ("rollout",)


@pytest.fixture(scope="module")
def compose() -> dict[str, dict[str, Any]]:
    return {variant: compose_config(variant) for variant in ("gpu", "cpu")}


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(ROOT / "k8s" / "overlays" / overlay) for overlay in OVERLAYS}


def stack_launch(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    """The command and environment `speechrl up` would start `name` with (its Popen call, captured)."""
    captured: dict[str, Any] = {}

    def popen(cmd: list[str], **kwargs: Any) -> SimpleNamespace:
        captured.update(cmd=cmd, env=kwargs["env"])
        return SimpleNamespace(pid=2**22 + 1)  # above pid_max: never a live process

    monkeypatch.setattr(stack, "subprocess", SimpleNamespace(Popen=popen, STDOUT=subprocess.STDOUT,
                                                             DEVNULL=subprocess.DEVNULL))
    monkeypatch.delenv(f"SPEECHRL_{name.upper()}_PORT", raising=False)
    paths = stack.StackPaths(tmp_path / name)
    paths.run.mkdir(parents=True)
    paths.logs.mkdir(parents=True)
    stack.start_service(name, paths)
    return captured["cmd"], captured["env"]


def health_target(name: str, port: int) -> str:
    """What `speechrl up` checks (stack.healthy): the HTTP readiness path of an HTTP service, else gRPC health."""
    path = stack.HTTP_READY_PATHS.get(name)
    return f"http://127.0.0.1:{port}{path}" if path else f"127.0.0.1:{port}"


# ------------------------------------------------------------------------------------- schemas

def test_compose_files_match_the_compose_spec(compose: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    # check-jsonschema's YAML reader does not know compose's !reset merge tag, so the override is
    # checked with each tag replaced by its value; the merged models are checked as compose prints them.
    override = without_merge_tags(ROOT / "docker-compose.cpu.yml", tmp_path / "docker-compose.cpu.yml")
    merged = []
    for variant, model in compose.items():
        merged.append(tmp_path / f"merged-{variant}.json")
        merged[-1].write_text(json.dumps(model))
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml"), str(override), *map(str, merged)])
    assert "!reset null" in (ROOT / "docker-compose.cpu.yml").read_text()  # the GPU reservations really go


def test_env_example_documents_the_defaults() -> None:
    # .env.example holds the defaults, so rendering with it or with no .env at all is the same stack,
    # and every name in it is one the compose files use.
    for variant in ("gpu", "cpu"):
        assert compose_config(variant, ".env.example") == compose_config(variant, None)
    used = set(re.findall(r"\$\{(\w+)", (ROOT / "docker-compose.yml").read_text()
                          + (ROOT / "docker-compose.cpu.yml").read_text()))
    names = set(re.findall(r"^(\w+)=", (ROOT / ".env.example").read_text(), re.M))
    assert names <= used, f"unused in compose: {sorted(names - used)}"
    assert used <= names, f"undocumented in .env.example: {sorted(used - names)}"


def test_overlays_render_and_validate_strictly(manifests: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    import yaml

    files = []
    for overlay, docs in manifests.items():
        files.append(tmp_path / f"{overlay}.yaml")
        files[-1].write_text(yaml.safe_dump_all(docs))
    # The models-pvc component, added to the gpu overlay as docs/deployment.md shows.
    with_models = tmp_path / "with-models"
    with_models.mkdir()
    k8s = os.path.relpath(ROOT / "k8s", with_models)
    (with_models / "kustomization.yaml").write_text(
        f"resources: [{k8s}/overlays/gpu]\ncomponents: [{k8s}/components/models-pvc]\n")
    docs = kustomize(with_models)
    claims = {v["persistentVolumeClaim"]["claimName"] for d in find(docs, "Deployment")
              for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"}
    assert claims == {"speechrl-models"} and find(docs, "PersistentVolumeClaim", "speechrl-models")
    files.append(tmp_path / "with-models.yaml")
    files[-1].write_text(yaml.safe_dump_all(docs))
    files.append(ROOT / "k8s" / "overlays" / "gpu" / "nvidia-time-slicing.yaml")
    run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, *map(str, files)])


def test_the_dashboard_component_admits_the_gateway_to_what_its_dashboard_reads(tmp_path: Path) -> None:
    overlay = tmp_path / "with-dashboard"
    overlay.mkdir()
    k8s = os.path.relpath(ROOT / "k8s", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{k8s}/overlays/gpu]\ncomponents: [{k8s}/components/dashboard]\n")
    docs = kustomize(overlay)
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
              for d in find(docs, "Deployment") + find(docs, "StatefulSet")}
    for target in ("rules", "intelligibility", "speaker", "token2wav", "encoder", "rollout", "redis", "trainer"):
        assert ingress_admits(docs, labels[target], labels["gateway"]), f"gateway cannot reach {target}"
    for source in ("encoder", "rollout", "rules"):  # nobody else gains anything
        assert not ingress_admits(docs, labels["trainer"], labels[source]), f"{source} reaches the trainer"


def test_image_targets_are_lean_and_non_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import dockerfile

    commands = dockerfile.parse_file(str(ROOT / "docker" / "Dockerfile"))
    stages: dict[str, list[Any]] = {}
    for command in commands:
        if command.cmd == "FROM":
            stages[command.value[-1]] = []
        elif stages:
            stages[list(stages)[-1]].append(command)
    assert {"cpu", "cuda"} <= set(stages)
    with monkeypatch.context() as m:  # the allocator settings the stack adds where jemalloc is installed
        m.setattr(stack.os.path, "exists", lambda path: True)
        wanted = stack.service_env({})
    for target in ("cpu", "cuda"):
        body = " ".join(" ".join(c.value) for c in stages[target] if c.cmd == "RUN")
        # cuda keeps gcc + python3-dev: Triton compiles its launcher at run time (see the Dockerfile).
        tools = r"build-essential|\bg\+\+|\bmake\b|\bgit\b|pip install" + ("" if target == "cuda" else r"|\bgcc\b")
        assert not re.search(tools, body), f"{target}: build tools in the final stage"
        users = [c.value[0] for c in stages[target] if c.cmd == "USER"]
        assert users and not users[-1].startswith(("0", "root")), f"{target} must run as a non-root user"
        # token2wav's espeak-phonemes backend (and tests' speech) need espeak-ng at run time.
        assert re.search(r"apt-get install[^&]*\bespeak-ng\b", body), f"{target}: espeak-ng not installed"
        env = image_env(target)
        assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"  # never download at start-up
        for key, value in wanted.items():
            if key == "OMP_NUM_THREADS":  # sized by the runtime / --threads, see the Dockerfile
                continue
            if key == "LD_PRELOAD":
                assert Path(env[key]).name == Path(stack.JEMALLOC).name
            else:
                assert env.get(key) == value, f"{target}: {key}={env.get(key)!r}, the stack sets {value!r}"
    allowed = (ROOT / ".dockerignore").read_text()
    for copied in ("clients/", "services/", "trainer/", "docker/"):
        assert f"!{copied}" in allowed


# ------------------------------------------------------------------------------------- parity

def test_compose_runs_what_the_local_stack_runs(compose: dict[str, dict[str, Any]], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(stack.STACK_SERVICES) == sorted(SERVICES) and stack.STACK_SERVICES[-1] == "gateway"
    for variant, model in compose.items():
        services = model["services"]
        assert set(services) == {*SERVICES, "redis"}, f"{variant}: {sorted(services)}"
        assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
        assert "--appendonly" in services["redis"]["command"]
        for name in SERVICES:
            service, port = services[name], DEFAULT_PORTS[name]
            cmd, _ = stack_launch(name, tmp_path / variant, monkeypatch)
            assert [sys.executable, *service["command"][1:]] == cmd and service["command"][0] == "python"
            assert [(p["target"], p["published"]) for p in service["ports"]] == [(port, str(port))]
            assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "speechrl.services.healthcheck",
                                                      health_target(name, port)]
            env = service["environment"]
            config = service_config(name, env)
            assert config.host == "0.0.0.0"
            assert config.auth_token_file == ""  # no token checked unless SPEECHRL_TOKENS_FILE is set
            assert service["secrets"] == [{"source": "speechrl-tokens", "target": "/run/secrets/speechrl-tokens"}]
            gpu = [d for d in (service.get("deploy") or {}).get("resources", {}).get("reservations", {})
                   .get("devices", []) if d["driver"] == "nvidia"]
            leased = bool(getattr(config, "lease_device", ""))
            assert bool(gpu) == (variant == "gpu" and name in GPU_SERVICES), (variant, name)
            assert leased == (variant == "gpu" and name in LEASED_SERVICES), (variant, name)
            if gpu:  # all on one GPU
                assert gpu[0]["device_ids"] == ["0"] and "gpu" in gpu[0]["capabilities"]
            if leased:  # one lease, one Redis
                assert config.lease_device == config.device == "cuda:0" and config.residency in ("offload", "sleep")
                assert config.redis_url == "redis://redis:6379/0"
                assert service["depends_on"]["redis"]["condition"] == "service_healthy"
            runs = [(v["target"], v.get("read_only", False)) for v in service["volumes"] if v.get("source") == "runs"]
            workdir = image_workdir(variant.replace("gpu", "cuda"))
            assert runs == ([(workdir, False)] if name == "trainer" else [(workdir, True)] if name in RUNS_READERS
                            else []), (variant, name, runs)
            if name == "trainer":  # jobs in Redis; jobs call the encoder, rollout and rules services
                assert config.redis_url == "redis://redis:6379/0"
                for needed in ("redis", "encoder", "rollout", "rules"):
                    assert service["depends_on"][needed]["condition"] == "service_healthy"
            if name == "gateway":
                for scorer in GATEWAY_BACKENDS:
                    assert getattr(config, scorer) == f"{scorer}:{DEFAULT_PORTS[scorer]}"
                    assert service["depends_on"][scorer]["condition"] == "service_healthy"


def test_manifests_run_what_compose_runs(compose: dict[str, dict[str, Any]],
                                         manifests: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, docs in manifests.items():
        for name in SERVICES:
            port = DEFAULT_PORTS[name]
            pod = find(docs, "Deployment", name)[0]["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            assert container["command"] == compose[overlay]["services"][name]["command"]
            gpu = overlay == "gpu" and name in GPU_SERVICES
            assert container["image"] == f"speechrl:{'cuda' if gpu else 'cpu'}"  # no CUDA image without a GPU
            assert container["ports"][0]["containerPort"] == port
            (svc,) = find(docs, "Service", name)
            assert svc["spec"]["ports"][0]["port"] == port
            if name in stack.HTTP_READY_PATHS:  # the stack's readiness path; a ClusterIP Service
                assert container["readinessProbe"]["httpGet"]["path"] == stack.HTTP_READY_PATHS[name]
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert "clusterIP" not in svc["spec"]
            else:  # native gRPC probes; headless Service so clients balance over the pods
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[probe]["grpc"]["port"] == port, (name, probe)
                assert svc["spec"]["clusterIP"] == "None"
            env = container_env(docs, container)
            k8s = dataclasses.asdict(service_config(name, env))
            ours = dataclasses.asdict(service_config(name, compose[overlay]["services"][name]["environment"]))
            # The same settings, except the Kubernetes sizes per pod: threads from the CPU limit, the
            # lease named after the node's GPU (the trainer's jobs: their default lease's prefix).
            for field in ("threads", "lease_device", "lease_prefix"):
                k8s_value, compose_value = k8s.pop(field, None), ours.pop(field, None)
                if field == "lease_device":
                    assert (k8s_value or "").endswith(compose_value or "") and bool(k8s_value) == bool(compose_value)
                if field == "lease_prefix" and name == "trainer":
                    assert k8s_value == ("node-a/" if overlay == "gpu" else "") and not compose_value, (overlay, k8s_value)
            assert k8s == ours, f"{overlay}/{name}: k8s and compose disagree"
            assert (container["resources"].get("limits", {}).get("nvidia.com/gpu") == 1) == gpu, (overlay, name)
            claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            runs = [(m["mountPath"], m.get("readOnly", False)) for m in container["volumeMounts"]
                    if claims.get(m["name"], {}).get("claimName") == "speechrl-runs"]
            workdir = image_workdir(container["image"].split(":")[1])
            assert runs == ([(workdir, False)] if name == "trainer" else [(workdir, True)] if name in RUNS_READERS
                            else []), (overlay, name, runs)
            if name in RUNS_READERS:
                assert all(c.get("readOnly") for c in claims.values() if c["claimName"] == "speechrl-runs")


def test_manifests_are_locked_down(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for docs in manifests.values():
        for workload in find(docs, "Deployment") + find(docs, "StatefulSet"):
            assert_locked_down(workload["spec"]["template"]["spec"])
        (trainer,) = find(docs, "Deployment", "trainer")  # one writer of the runs volume, replaced not rolled
        assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
        (runs,) = find(docs, "PersistentVolumeClaim", "speechrl-runs")
        assert runs["spec"]["accessModes"] == ["ReadWriteMany"]  # trainer writes, rollout pods on any node read
        assert {h["spec"]["scaleTargetRef"]["name"] for h in find(docs, "HorizontalPodAutoscaler")} == {
            "rules", "intelligibility", "speaker"}
        assert {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
                for p in find(docs, "PodDisruptionBudget")} == {"rules", "intelligibility", "speaker", "gateway"}
        (scorers,) = find(docs, "NetworkPolicy", "scorers-from-gateway-and-trainer")
        peers = scorers["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
        assert sorted(peers) == ["gateway", "trainer"]
        for name in ("rules", "intelligibility", "speaker"):
            labels = find(docs, "Deployment", name)[0]["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/component"] == "scorer"
        redis_clients = {d["metadata"]["name"] for d in find(docs, "Deployment")
                         if d["spec"]["template"]["metadata"]["labels"].get("speechrl.io/redis-client") == "true"}
        assert {*GPU_SERVICES, "trainer"} <= redis_clients
        # The trainer reaches every gRPC service and Redis; the gateway only the scorers, not the trainer.
        labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                  for d in find(docs, "Deployment") + find(docs, "StatefulSet")}
        for target in ("rules", "intelligibility", "speaker", "encoder", "rollout", "token2wav", "redis"):
            assert ingress_admits(docs, labels[target], labels["trainer"]), f"trainer cannot reach {target}"
        for target in GATEWAY_BACKENDS:
            assert ingress_admits(docs, labels[target], labels["gateway"]), f"gateway cannot reach {target}"
            assert ingress_admits(docs, labels[target], labels["trainer"]), f"trainer cannot reach {target}"
        for source in ("encoder", "rollout", "rules", "intelligibility", "speaker"):  # only gateway and trainer
            assert not ingress_admits(docs, labels["token2wav"], labels[source]), f"{source} reaches token2wav"
        for target in ("encoder", "rollout", "redis", "trainer"):
            assert not ingress_admits(docs, labels[target], labels["gateway"]), f"gateway reaches {target}"
        assert ingress_admits(docs, labels["trainer"], {"speechrl.io/trainer-client": "true"})
        (redis,) = find(docs, "StatefulSet", "redis")
        assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_round_robin_spreads_calls_over_the_addresses_of_one_name() -> None:
    # A headless Service's name resolves to one address per pod; `ipv4:a,b` is that resolution.
    from speechrl.client._channel import channel_options
    from speechrl.services.rules.server import RulesConfig, start
    from speechrl.v1 import common_pb2, common_pb2_grpc, rule_rewards_pb2, rule_rewards_pb2_grpc
    from tests.support.servers import serve_in_thread

    with serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as a, \
            serve_in_thread(lambda: start(RulesConfig(port=free_port()))) as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with grpc.insecure_channel(target, options=channel_options()) as channel:
            stub = rule_rewards_pb2_grpc.RuleRewardsStub(channel)
            request = rule_rewards_pb2.ScoreRulesRequest(items=[rule_rewards_pb2.RuleRewardItem(
                hypothesis="a b", reference="a b")])
            for _ in range(8):
                stub.ScoreRules(request, timeout=10)
        for server in (a, b):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                status = common_pb2_grpc.ServiceStatusStub(channel).GetServiceStatus(
                    common_pb2.GetServiceStatusRequest(), timeout=10)
            assert status.items_processed >= 2, f"one address got {status.items_processed} of 8 calls"


# ------------------------------------------------------------------------------------- start them

def stop_within(proc: subprocess.Popen[bytes], grace: float) -> int | str:
    """The exit code after SIGTERM, or "killed" past grace (docker's stop_grace_period: 30 s)."""
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"


def assert_tokens_are_checked_and_sent(ports: dict[str, int]) -> None:
    """The gateway wants a token from the file, and passes the rules service's check with the file's first."""
    import httpx

    from speechrl.client import RuleRewardsClient, ServiceError

    body = {"items": [{"hypothesis": "the cat sat", "reference": "the cat sat"}]}
    url = f"http://127.0.0.1:{ports['gateway']}/v1/rules/score"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    for token in ("new-token", "old-token"):
        reply = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["results"][0]["score"]["wer"] == 0.0, reply.text
    with RuleRewardsClient(f"127.0.0.1:{ports['rules']}", token="", timeout_s=10) as client, \
            pytest.raises(ServiceError) as refused:
        client.score(["a"], ["a"])
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    jobs = f"http://127.0.0.1:{ports['trainer']}/v1/jobs"
    assert httpx.get(jobs, timeout=30).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer new-token"}, timeout=30).status_code == 200


def test_compose_services_start_here_and_turn_healthy(compose: dict[str, dict[str, Any]], tmp_path: Path,
                                                      redis_server: RedisServer) -> None:
    """Each CPU compose service's command and environment, on this machine: ports remapped to free
    ones, the image's ENV with /cache in tmp_path (and Hugging Face offline), no lease, the compose
    Redis replaced by a private redis-server (the trainer's job store), and tokens on
    (SPEECHRL_TOKENS_FILE set, its secret's path mapped to the file)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# rotating: the new token first\nnew-token\nold-token\n")
    (tmp_path / "tokens.env").write_text(f"SPEECHRL_TOKENS_FILE={tokens}\n")
    model = compose_config("cpu", str(tmp_path / "tokens.env"))
    assert model["secrets"]["speechrl-tokens"]["file"] == str(tokens)
    services = model["services"]
    ports = {name: free_port() for name in STARTED_HERE}
    image = {k: v.replace("/cache", str(tmp_path / "cache")) for k, v in image_env("cpu").items()
             if k not in ("PATH", "VIRTUAL_ENV", "HOME", "LD_PRELOAD")}
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPEECHRL_")} | image
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in STARTED_HERE:
            service = services[name]
            cmd = [sys.executable if part == "python" else part for part in service["command"]]
            cmd[cmd.index("--port") + 1] = str(ports[name])
            env = dict(service["environment"])
            for key, value in env.items():
                if key.endswith("_HOST"):
                    env[key] = "127.0.0.1"
                elif key.endswith("_METRICS_PORT"):
                    env[key] = str(free_port())
                elif key.endswith("_REDIS_URL"):
                    assert value == "redis://redis:6379/0"
                    env[key] = redis_server.url
                elif m := re.fullmatch(r"(\w+):(\d+)", value):  # gateway -> scorer endpoints
                    assert int(m.group(2)) == DEFAULT_PORTS[m.group(1)]
                    env[key] = f"127.0.0.1:{ports[m.group(1)]}"
                elif key.endswith("_LEASE_DEVICE"):
                    assert value == ""
                elif key.endswith("_TOKEN_FILE"):  # every service checks, gateway and trainer send too
                    assert value == "/run/secrets/speechrl-tokens"
                    env[key] = str(tokens)
            log = (tmp_path / f"{name}.log").open("wb")
            procs[name] = subprocess.Popen(cmd, env=stack.service_env(base | env), stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        pending, deadline = set(STARTED_HERE), time.monotonic() + 240
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                if procs[name].poll() is not None:
                    pytest.fail(f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}")
                target = health_target(name, ports[name])
                if (http_status(target, 1.0) == "200") if name in stack.HTTP_READY_PATHS \
                        else (grpc_status(target, timeout=1.0) == "SERVING"):
                    pending.discard(name)
            time.sleep(0.5)
        assert not pending, f"not healthy within 240 s: {sorted(pending)}"
        for name in STARTED_HERE:  # the compose health check itself, against the remapped port
            test = services[name]["healthcheck"]["test"][1:]
            probe = [sys.executable, *test[1:-1], health_target(name, ports[name])]
            assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0, name
        for name in STARTED_HERE:
            assert f"SPEECHRL_{name.upper()}_AUTH_TOKEN_FILE" in services[name]["environment"], name
        assert_tokens_are_checked_and_sent(ports)
        dead = subprocess.run([sys.executable, "-m", "speechrl.services.healthcheck", f"127.0.0.1:{free_port()}",
                               "--timeout", "0.5"], capture_output=True, text=True, timeout=30)
        assert dead.returncode == 1 and "UNAVAILABLE" in dead.stdout
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        codes = {name: stop_within(proc, grace=30) for name, proc in procs.items()}
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the HTTP services' clean stop reads -15.
    clean = {name: -signal.SIGTERM if name in stack.HTTP_READY_PATHS else 0 for name in STARTED_HERE}
    assert codes == clean, f"not a clean stop on SIGTERM: {codes}"
    for name in stack.HTTP_READY_PATHS:
        assert "Application shutdown complete" in (tmp_path / f"{name}.log").read_text(), name
