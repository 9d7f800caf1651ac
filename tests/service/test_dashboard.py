"""The gateway's dashboard without a browser: the page and its JSON routes behind the token, the
lease timeline from real lease events in a real Redis, the services panel from a real server's status
and Prometheus metrics, and the job proxy against the real trainer service.
(The page itself, in headless Chromium over a training job: tests/training/test_dashboard_browser.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from speechrl.services.gateway.config import GatewayConfig
from speechrl.services.gateway.main import create_app
from speechrl.services.lease import GpuLease, LeaseSettings, lease_redis
from speechrl.services.ledger import DeviceLedger
from speechrl.services.ports import free_port
from speechrl.services.rules.server import RulesConfig, start
from tests.support.servers import RedisServer, serve_in_thread, uvicorn_in_thread

TOKEN = "dash-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OFF: dict[str, Any] = {"intelligibility": "", "speaker": "", "rules": "", "encoder": "", "rollout": "", "trainer": "",
                       "redis_url": ""}


def gateway(**settings: Any) -> TestClient:
    return TestClient(create_app(GatewayConfig(**{**OFF, **settings})))


def test_the_page_loads_without_a_token_and_its_data_needs_one() -> None:
    with gateway(auth_tokens=TOKEN, trainer=f"http://127.0.0.1:{free_port()}") as http:
        page = http.get("/ui")
        assert page.status_code == 200 and 'src="ui/dashboard.js"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]  # no CDN, no inline script
        for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
            reply = http.get(f"/ui/{asset}")
            assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind)
        assert "http" not in http.get("/ui/dashboard.js").text.split("SVG_NS")[0]  # nothing fetched from elsewhere
        assert http.get("/v1/dashboard/auth").json() == {"token_required": True}
        for path in ("services", "lease", "jobs", "jobs/j1", "jobs/j1/metrics"):
            assert http.get(f"/v1/dashboard/{path}").status_code == 401, path
            assert http.get(f"/v1/dashboard/{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # Nothing writable without the token: refused before it reaches the trainer.
        assert http.post("/v1/dashboard/jobs/j1/cancel", json={}).status_code == 401
        assert http.get("/v1/dashboard/services", headers=AUTH).status_code == 200
        assert http.get("/v1/dashboard/jobs", headers=AUTH).json()["error"].startswith("trainer unreachable")
    with gateway() as http:  # the laptop default: no token anywhere
        assert http.get("/v1/dashboard/auth").json() == {"token_required": False}
        assert http.get("/v1/dashboard/services").json() == {"services": [], "window_s": 15.0}


def test_openapi_documents_the_dashboard_routes() -> None:
    with gateway() as http:
        spec = http.get("/openapi.json").json()
    assert {"/v1/dashboard/services", "/v1/dashboard/lease", "/v1/dashboard/jobs", "/v1/dashboard/jobs/{job_id}",
            "/v1/dashboard/jobs/{job_id}/metrics", "/v1/dashboard/jobs/{job_id}/cancel"} <= set(spec["paths"])
    assert "/ui" not in spec["paths"]
    assert "data-owner" not in str(spec)
    schemas = spec["components"]["schemas"]
    assert {"segments", "wait_ms", "hold_ms", "ledger", "queue"} <= set(schemas["DeviceOut"]["properties"])


def test_the_lease_timeline_shows_each_holder_its_expiry_and_the_ledger(redis_server: RedisServer) -> None:
    async def take_turns() -> None:
        fast = LeaseSettings(ttl_ms=300, poll_ms=20)
        encoder = GpuLease(lease_redis(redis_server.url), owner="encoder-11", settings=fast)
        crashed = GpuLease(lease_redis(redis_server.url), owner="rollout:22", settings=fast)
        # The trainer's grant lives 30 s without a heartbeat: still held when the page asks.
        trainer = GpuLease(lease_redis(redis_server.url), owner="trainer-33", settings=LeaseSettings(ttl_ms=30_000, poll_ms=20))
        async with encoder.hold("cpu:0"):
            await asyncio.sleep(0.05)
        await crashed.acquire("cpu:0")  # never released, never renewed: it lapses after 300 ms
        await trainer.acquire("cpu:0", timeout=5)  # finds the lapsed holder: the expiry is recorded, trainer holds
        for lease in (encoder, crashed, trainer):
            await lease.client.aclose()

    asyncio.run(take_turns())
    DeviceLedger(redis_server.url, "trainer-33").report("cpu:0", "resident", 2**20)
    with gateway(redis_url=redis_server.url) as http:
        lease = http.get("/v1/dashboard/lease?window_s=60").json()
    assert lease["error"] == "" and lease["now_ms"] - lease["since_ms"] == 60_000
    (device,) = lease["devices"]
    got = [(s["owner"], s["role"], s["end"]) for s in device["segments"]]
    assert got == [("encoder-11", "encoder", "release"), ("rollout:22", "rollout", "expire"),
                   ("trainer-33", "trainer", "open")]
    assert [s["fence"] for s in device["segments"]] == sorted(s["fence"] for s in device["segments"])
    assert device["segments"][-1]["end_ms"] == lease["now_ms"] and device["holder"] == "trainer-33"
    assert [(e["owner"], e["held_ms"] >= 300) for e in device["expiries"]] == [("rollout:22", True)]
    assert device["wait_ms"]["count"] == 3 and device["wait_ms"]["max"] >= 250  # the trainer waited out the TTL
    assert device["hold_ms"]["count"] == 2 and device["stats"]["expiries"] == 1
    assert device["window_counts"] == {"grant": 3, "release": 1, "expire": 1}
    assert [(e["owner"], e["residency"], e["weight_bytes"]) for e in device["ledger"]] == [("trainer-33", "resident", 2**20)]


def test_the_services_panel_reads_status_prometheus_and_a_down_service() -> None:
    metrics_port = free_port()
    with serve_in_thread(lambda: start(RulesConfig(port=free_port(), metrics_port=metrics_port))) as rules:
        endpoint = f"127.0.0.1:{rules.port}"
        dead = f"127.0.0.1:{free_port()}"
        with gateway(rules=endpoint, encoder=dead, service_metrics=f"rules=127.0.0.1:{metrics_port}") as http:
            first = {s["name"]: s for s in http.get("/v1/dashboard/services").json()["services"]}
            body = {"items": [{"hypothesis": "the cat sat", "reference": "the cat sat on the mat"}] * 4}
            for _ in range(5):
                assert http.post("/v1/rules/score", json=body).status_code == 200
            time.sleep(0.2)
            started = time.monotonic()
            second = {s["name"]: s for s in http.get("/v1/dashboard/services").json()["services"]}
            assert time.monotonic() - started < 5, "a down service must not stall the panel"
    assert first["rules"]["throughput_items_s"] is None  # one poll: no rate yet
    rules_now = second["rules"]
    assert rules_now["health"] == {endpoint: "SERVING"} and rules_now["error"] == ""
    assert rules_now["backend"] and rules_now["items_processed"] - first["rules"]["items_processed"] == 20
    assert rules_now["throughput_items_s"] > 0 and rules_now["latency_p50_ms"] is not None
    assert rules_now["latency_p95_ms"] >= rules_now["latency_p50_ms"] and rules_now["mean_batch_size"] >= 1
    assert second["encoder"]["error"].startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert second["encoder"]["backend"] == "" and second["encoder"]["latency_p50_ms"] is None


@pytest.fixture
def trainer(redis_server: RedisServer, tmp_path: Path) -> Iterator[str]:
    """The real trainer service (its job API) with no worker: submitted jobs stay queued."""
    from speechrl.trainer.jobs.service import TrainerConfig
    from speechrl.trainer.jobs.service import create_app as trainer_app

    app = trainer_app(TrainerConfig(redis_url=redis_server.url, journal_dir=""), start_worker=False)
    with uvicorn_in_thread(app) as url:
        yield url


def test_the_job_proxy_lists_plots_and_cancels_through_the_trainer(trainer: str, tmp_path: Path) -> None:
    import httpx

    from speechrl.trainer.jobs.checkpoint import TrainState, checkpoint_dir

    job = httpx.post(f"{trainer}/v1/jobs", json={"kind": "asr-grpo", "policy": "p", "data": "d", "steps": 5,
                                                 "out_dir": str(tmp_path / "run")}).json()
    folder = checkpoint_dir(tmp_path / "run") / "step-000002"
    folder.mkdir(parents=True)
    TrainState(step=2, fence=41).save(folder)
    with gateway(trainer=trainer, auth_tokens=TOKEN) as http:
        listed = http.get("/v1/dashboard/jobs", headers=AUTH).json()
        assert listed["error"] == "" and [(j["id"], j["status"]) for j in listed["jobs"]] == [(job["id"], "queued")]
        assert "config" not in listed["jobs"][0]  # small: the list leaves the job file out
        detail = http.get(f"/v1/dashboard/jobs/{job['id']}", headers=AUTH).json()
        assert [(c["step"], c["fence"]) for c in detail["checkpoints"]] == [(2, 41)]
        assert http.get(f"/v1/dashboard/jobs/{job['id']}/metrics?since_step=0", headers=AUTH).json() == []
        assert http.get("/v1/dashboard/jobs/nope", headers=AUTH).status_code == 404
        assert http.get("/v1/dashboard/jobs/..", headers=AUTH).status_code in (404, 422)  # never a path out of /v1/jobs
        form = http.post(f"/v1/dashboard/jobs/{job['id']}/cancel", headers={**AUTH, "Content-Type": "text/plain"},
                         content=b"{}")
        assert form.status_code in (415, 422), form.text  # a cross-site form post cannot cancel
        cancelled = http.post(f"/v1/dashboard/jobs/{job['id']}/cancel", headers=AUTH, json={"reason": "test"})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert http.get("/v1/dashboard/jobs", headers=AUTH).json()["jobs"][0]["status"] == "cancelled"
