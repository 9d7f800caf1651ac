"""Monitoring, checked offline: the alerts (k8s/components/monitoring/alerts.yml) by `promtool check
rules` and, on synthetic series, `promtool test rules`; the Grafana dashboard's expressions by
promtool too (each wrapped as a recording rule); every metric and label the two name against what
the code declares, and that against a live /metrics scrape; the k8s component rendered with the gpu
overlay and validated (the operator's resources against its CRDs, tests/support/crds, release
v0.93.0); the compose profile `monitoring` against the compose spec and the stack; the trainer's job
counters. The last test shows the checks failing on a broken rule.

promtool comes from Debian's `prometheus` package (scripts/bootstrap.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from speechrl.services import stack
from speechrl.services.cli import service_modules
from speechrl.services.ports import DEFAULT_PORTS, free_port
from tests.support.deployment import K8S_VERSION, ROOT, crd_json_schema, find, kustomize, run, selects, tool
from tests.support.monitoring import (
    ALERTS,
    DASHBOARD,
    PROMETHEUS_RULE,
    TARGET_LABELS,
    alert_rules,
    dashboard_queries,
    declared_metrics,
    exported_series,
    expr_problems,
    prometheus_rule_text,
    recording_rules,
)
from tests.support.servers import RedisServer, serve_in_thread

SERVICES = tuple(service_modules())
ALERT_TESTS = ROOT / "tests" / "support" / "prometheus" / "alerts_test.yml"
CRDS = ROOT / "tests" / "support" / "crds"
OPERATOR_KINDS = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                  "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}   # as the operator labels a Prometheus' pods
MONITORING_NAMESPACE = {"speechrl.io/monitoring": "true"}
# Declared, but registered only where torch sees a CUDA device (server.register_gpu_metrics).
CUDA_ONLY = {"speechrl_gpu_memory_bytes"}


def promtool(*args: str) -> str:
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool is missing: run scripts/bootstrap.sh (Debian's prometheus package)")
    return run([path, *args]).stdout


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    return exported_series(declared_metrics())


# ------------------------------------------------------------------------------------- alerts

def test_alerts_check_and_each_fires_on_synthetic_series() -> None:
    promtool("check", "rules", str(ALERTS))
    promtool("test", "rules", str(ALERT_TESTS))
    tested = {case["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules()} == tested, "every alert needs a case where it fires"


def test_alerts_and_dashboard_name_only_exported_metrics(series: dict[str, frozenset[str]]) -> None:
    problems = {rule["alert"]: expr_problems(rule["expr"], series) for rule in alert_rules()}
    for title, expr, legend in dashboard_queries():
        found = expr_problems(expr, series)
        # A legend can only show a label the query's series carry.
        carried = set().union(*(labels for name, labels in series.items() if name in expr)) | TARGET_LABELS
        found += [f"legend label {label!r}" for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)
                  if label not in carried]
        problems[f"panel {title!r}: {expr}"] = found
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
            assert query, variable["query"]
            metric, label = query.groups()
            problems[f"variable {variable['name']}"] = [] if label in series.get(metric, ()) else [f"{metric}/{label}"]
    assert not {where: found for where, found in problems.items() if found}


def test_dashboard_queries_parse_and_use_the_datasource_variable(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(yaml.safe_dump(recording_rules([expr for _, expr, _ in queries])))
    assert f"SUCCESS: {len(queries)} rules found" in promtool("check", "rules", str(rules))
    dashboard = json.loads(DASHBOARD.read_text())
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_declared_metrics_are_what_a_live_scrape_shows(series: dict[str, frozenset[str]]) -> None:
    # Import every module that declares metrics, as the services do, then scrape a real server.
    import speechrl.services.gateway.metrics
    import speechrl.services.lease
    import speechrl.trainer.jobs.service  # noqa: F401
    from speechrl.client import RuleRewardsClient
    from speechrl.services.rules.server import RulesConfig, start

    config = RulesConfig(port=free_port(), metrics_port=free_port())
    with serve_in_thread(lambda: start(config)) as running:
        with RuleRewardsClient(f"127.0.0.1:{running.port}", timeout_s=10) as client:
            client.score(["the cat"], ["the cat"])
        text = httpx.get(f"http://127.0.0.1:{config.metrics_port}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("speechrl_")}
    declared = {name.removesuffix("_total") for name in declared_metrics()} - CUDA_ONLY
    assert {name for name in families if not name.endswith("_created")} == declared  # _created: their own gauges
    assert families["speechrl_grpc_requests"].samples, "the call was counted"
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= series[sample.name], sample


# ------------------------------------------------------------------------------------- k8s

def scrape_admitted(docs: list[dict[str, Any]], pod: dict[str, str], port: str, namespace: dict[str, str],
                    source: dict[str, str]) -> bool:
    """Whether a pod labelled `source` in a namespace labelled `namespace` may reach `port` of `pod`."""
    for policy in find(docs, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], pod):
            continue
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
                continue
            if "from" not in rule or any("namespaceSelector" in peer and selects(peer["namespaceSelector"], namespace)
                                         and selects(peer.get("podSelector", {}), source) for peer in rule["from"]):
                return True
    return False


def test_component_renders_with_the_gpu_overlay_and_validates(tmp_path: Path) -> None:
    overlay = tmp_path / "with-monitoring"
    overlay.mkdir()
    k8s = os.path.relpath(ROOT / "k8s", overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{k8s}/overlays/gpu]\ncomponents: [{k8s}/components/monitoring]\n")
    docs = kustomize(overlay)
    for kind, crd in OPERATOR_KINDS.items():
        (doc,) = find(docs, kind)
        assert doc["metadata"]["namespace"] == "speechrl"
        schema, rendered = tmp_path / f"{kind}.schema.json", tmp_path / f"{kind}.json"
        # The CRD's one case-insensitive pattern in a form JSON Schema's (ECMAScript) regexes know.
        schema.write_text(json.dumps(crd_json_schema(CRDS / crd, "v1")).replace(
            "^(?i)(abort|warn)?$", "^([Aa][Bb][Oo][Rr][Tt]|[Ww][Aa][Rr][Nn])?$"))
        rendered.write_text(json.dumps(doc))
        run([tool("check-jsonschema"), "--schemafile", str(schema), str(rendered)])
    others = tmp_path / "others.yaml"
    others.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in OPERATOR_KINDS]))
    run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(others)])

    # The PrometheusRule holds alerts.yml's groups, as `python -m tests.support.monitoring` writes it.
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text()
    (rule,) = find(docs, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    (dashboard,) = find(docs, "ConfigMap", "speechrl-grafana-dashboard")
    assert dashboard["metadata"]["namespace"] == "speechrl" and dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["speechrl.json"]) == json.loads(DASHBOARD.read_text())

    # The PodMonitor scrapes every service on the port its metrics are on, named as in compose, and
    # the NetworkPolicies let the Prometheus pods of a monitoring namespace (and no other pod) reach it.
    (monitor,) = find(docs, "PodMonitor")
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    endpoints = {e["port"]: e.get("path", "/metrics") for e in monitor["spec"]["podMetricsEndpoints"]}
    scraped = {}
    for deployment in find(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if selects(monitor["spec"]["selector"], labels):
            (container,) = deployment["spec"]["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"] in endpoints}
            assert len(ports) == 1, (deployment["metadata"]["name"], ports)
            (name, number), = ports.items()
            scraped[labels["app.kubernetes.io/name"]] = number
            assert endpoints[name] == "/metrics"
            assert scrape_admitted(docs, labels, name, MONITORING_NAMESPACE, PROMETHEUS_POD), deployment["metadata"]["name"]
            if labels["app.kubernetes.io/name"] != "gateway":  # which takes traffic from anywhere
                assert not scrape_admitted(docs, labels, name, {}, PROMETHEUS_POD), "an unlabelled namespace gets in"
    assert scraped == {name: 9464 if name not in stack.HTTP_READY_PATHS else DEFAULT_PORTS[name] for name in SERVICES}
    trainer = find(docs, "Deployment", "trainer")[0]["spec"]["template"]["metadata"]["labels"]
    assert not scrape_admitted(docs, trainer, "http", MONITORING_NAMESPACE, {"app.kubernetes.io/name": "grafana"})


# ------------------------------------------------------------------------------------- compose

def compose_with_monitoring(env_file: str | None) -> dict[str, Any]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    cmd = [tool("docker-compose"), "-f", "docker-compose.yml", "--env-file", env_file or os.devnull,
           "--profile", "monitoring", "config", "--format", "json"]
    return dict(json.loads(run(cmd, cwd=ROOT, env=env).stdout))


def test_compose_profile_scrapes_the_stack(tmp_path: Path) -> None:
    model = compose_with_monitoring(".env.example")
    assert model == compose_with_monitoring(None), ".env.example must hold the defaults"
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps(model))
    run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(merged)])
    services = model["services"]
    assert set(services) == {*SERVICES, "redis", "prometheus", "grafana"}
    for name, image in (("prometheus", "prom/prometheus:"), ("grafana", "grafana/grafana-oss:")):
        service = services[name]
        assert service["profiles"] == ["monitoring"] and service["image"].startswith(image)
        assert [p["host_ip"] for p in service["ports"]] == ["127.0.0.1"]
        for volume in service["volumes"]:
            if volume["type"] == "bind":  # docker would create a missing one as an empty folder
                assert Path(volume["source"]).exists() and volume["read_only"], volume
    mounts = {v["target"]: Path(v["source"]) for s in ("prometheus", "grafana") for v in services[s]["volumes"]
              if v["type"] == "bind"}
    assert mounts["/etc/prometheus/alerts.yml"] == ALERTS and mounts["/etc/grafana/dashboards/speechrl.json"] == DASHBOARD

    # One scrape job per service, named after it, at its metrics port (or HTTP port) in the compose model.
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]] for job in config["scrape_configs"]}
    wanted = {}
    for name in SERVICES:
        port = services[name]["environment"].get(f"SPEECHRL_{name.upper()}_METRICS_PORT")
        assert bool(port) != (name in stack.HTTP_READY_PATHS), name  # HTTP services serve /metrics themselves
        wanted[name] = [f"{name}:{port or services[name]['ports'][0]['target']}"]
    assert jobs == wanted
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump({**config, "rule_files": [str(ALERTS)]}))
    promtool("check", "config", str(checked))

    # Grafana: the compose Prometheus as data source, the dashboard's folder as a provider.
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    assert services["prometheus"]["ports"][0]["target"] == 9090
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "speechrl.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"


# ------------------------------------------------------------------------------------- trainer

def test_trainer_counts_jobs_by_status_and_steps(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from speechrl.trainer.jobs import service
    from speechrl.trainer.jobs.store import JobStore

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def fake_run(kind: str, config: Any, progress: Any) -> dict[str, Any]:
        progress.report(1, 2, {"loss": 0.5})
        progress.report(2, 2, {"loss": 0.4})
        if config.steps == 3:
            raise RuntimeError("a job that breaks")
        return {}

    monkeypatch.setattr(service, "run_job", fake_run)
    store = JobStore(redis.Redis.from_url(redis_server.url))
    worker = service.Worker(store, poll_seconds=0.1)
    before = {status: value("speechrl_trainer_jobs_total", status=status) for status in ("succeeded", "failed")}
    steps = value("speechrl_trainer_steps_total")
    job = {"policy": "warm-start", "data": "train.jsonl"}  # not read: run_job is the fake
    worker.run(store.submit("asr-grpo", {**job, "steps": 2}, "out", total_steps=2).id)
    worker.run(store.submit("asr-grpo", {**job, "steps": 3}, "out", total_steps=3).id)
    assert value("speechrl_trainer_jobs_total", status="succeeded") == before["succeeded"] + 1
    assert value("speechrl_trainer_jobs_total", status="failed") == before["failed"] + 1
    assert value("speechrl_trainer_steps_total") == steps + 4
    # Served on the job API's port, without a token even where the API wants one.
    app = service.create_app(service.TrainerConfig(redis_url=redis_server.url, journal_dir="", auth_tokens="t"),
                             start_worker=False)
    with TestClient(app) as client:
        scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert 'speechrl_trainer_jobs_total{status="cancelled"} 0.0' in scraped.text


# ------------------------------------------------------------------------------------- the checks fail

def test_the_checks_catch_a_misspelt_metric_and_a_broken_expression(series: dict[str, frozenset[str]],
                                                                    tmp_path: Path) -> None:
    text = ALERTS.read_text()
    rules = tmp_path / "alerts.yml"
    rules.write_text(text.replace("speechrl_lease_wait_seconds_bucket", "speechrl_lease_wiat_seconds_bucket"))
    promtool("check", "rules", str(rules))  # valid PromQL: promtool alone cannot tell
    found = [p for rule in alert_rules(rules) for p in expr_problems(rule["expr"], series)]
    assert found[0] == "unknown metric 'speechrl_lease_wiat_seconds_bucket'"  # then its labels, unknown too
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.read_text().replace("../../../k8s/components/monitoring/alerts.yml", str(rules)))
    with pytest.raises(AssertionError, match="SpeechRLLeaseWaitHigh"):  # and the alert no longer fires
        promtool("test", "rules", str(tests))
    # A label the metric lacks, and an expression that does not parse.
    assert expr_problems('sum by (jbo) (rate(speechrl_items_total{outcom="failed"}[5m]))', series) == [
        "speechrl_items_total has no label 'outcom'", "no series of the expression has label 'jbo'"]
    rules.write_text(text.replace("[10m]))) > 30", "[10m])) > 30"))
    with pytest.raises(AssertionError, match="parse error|unclosed"):
        promtool("check", "rules", str(rules))
