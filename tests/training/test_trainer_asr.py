"""GRPO for the LLM-ASR through the real services and Redis: two steps change the weights, the
rollout service's version follows the trainer's, and a checkpoint resumes to the same step."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from speechrl.client import RolloutClient
from speechrl.services.ports import free_port
from speechrl.trainer.jobs.registry import run_job
from tests.support.servers import RedisServer
from tests.support.training import Recorder, Stack, asr_job, asr_stack, assert_lora_merged, assert_most_weights_moved


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from asr_stack(tmp_path_factory.mktemp("asr-grpo"))


job = asr_job  # the tests below read as job(stack, out, steps, redis_url)


def test_two_steps_then_resume(stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    out = tmp_path / "run"
    first = Recorder()
    summary = run_job("asr-grpo", job(stack, out, 2, redis_server.url), first)
    assert [s for s, _ in first.steps] == [1, 2] and first.resumed_from == 0
    for _, metrics in first.steps:
        for key in ("reward_mean", "reward/accuracy", "reward/hallucination", "wer", "insertions", "kl",
                    "clip_fraction", "time/encode", "time/rollout", "time/score", "time/update", "time/sync"):
            assert math.isfinite(metrics[key]), key
    assert "eval/wer" in first.steps[-1][1]
    # Version 1 is the trainer's initial sync, then one per step: the rollouts stayed on-policy.
    with RolloutClient(stack.rollout) as rollout:
        assert rollout.get_service_status().policy_version == 3
    assert first.steps[-1][1]["policy_version"] == 3

    assert_most_weights_moved(stack.policy, out, "step-000002")

    second = Recorder()
    run_job("asr-grpo", job(stack, out, 3, redis_server.url), second)
    assert [s for s, _ in second.steps] == [3], "the resumed run continues after its checkpoint"
    assert second.resumed_from == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert Path(summary["plot"]).exists() and (out / "tensorboard").is_dir()
    with RolloutClient(stack.rollout) as rollout:
        assert rollout.get_service_status().policy_version == 5  # resume sync, then step 3


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def job_payload(stack: Stack, out: Path, steps: int, redis_url: str) -> dict[str, Any]:
    from dataclasses import asdict

    return {"kind": "asr-grpo", **asdict(job(stack, out, steps, redis_url))}


def test_job_api_submit_watch_and_refuse_bad_jobs(stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    from fastapi.testclient import TestClient

    from speechrl.trainer.jobs.service import TrainerConfig, create_app

    app = create_app(TrainerConfig(redis_url=redis_server.url, poll_seconds=0.2))
    with TestClient(app) as http:
        bad = http.post("/v1/jobs", json={"kind": "asr-grpo", "policy": "p", "data": "d", "stepz": 3})
        assert bad.status_code == 400 and "stepz" in bad.json()["detail"]
        assert http.post("/v1/jobs", json={"kind": "tts"}).status_code == 400
        assert http.get("/v1/jobs/nope").status_code == 404
        submitted = http.post("/v1/jobs", json=job_payload(stack, tmp_path / "api", 2, redis_server.url))
        assert submitted.status_code == 201
        job_id = submitted.json()["id"]
        memory: list[dict[str, Any]] = []  # what the running job reported holding on its device

        def finished() -> Any:
            job_status = http.get(f"/v1/jobs/{job_id}").json()
            memory.extend(job_status["device_memory"])
            return job_status["status"] in ("succeeded", "failed") and job_status

        done = wait_for(finished, 300, "the job to finish")
        assert done["status"] == "succeeded", done["error"]
        assert [m["step"] for m in http.get(f"/v1/jobs/{job_id}/metrics").json()] == [1, 2]
        assert any(e["device"] == "cpu:0" and e["owner"].startswith("trainer-") for e in memory), memory
        assert [m["step"] for m in http.get(f"/v1/jobs/{job_id}/metrics?since_step=1").json()] == [2]
        assert http.get("/v1/jobs").json()[0]["id"] == job_id
        assert http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "succeeded"
        assert http.get("/readyz").status_code == 200


def test_a_redis_restart_without_persistence_loses_no_job(stack: Stack, tmp_path: Path,
                                                          redis_server: RedisServer) -> None:
    import time

    import httpx
    from fastapi.testclient import TestClient

    from speechrl.trainer.jobs.service import TrainerConfig, create_app

    def listed(http: TestClient) -> list[str] | None:
        try:
            reply = http.get("/v1/jobs")
        except httpx.HTTPError:
            return None
        return [j["id"] for j in reply.json()] if reply.status_code == 200 else None

    app = create_app(TrainerConfig(redis_url=redis_server.url, poll_seconds=0.2, journal_dir=str(tmp_path / "journal")))
    with TestClient(app) as http:
        job_id = http.post("/v1/jobs", json=job_payload(stack, tmp_path / "restart", 3, redis_server.url)).json()["id"]
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["step"] >= 1, 300, "the first step")
        redis_server.stop()  # no persistence: the job's record, its metrics and the queue are gone
        time.sleep(0.5)
        redis_server.start()
        assert wait_for(lambda: listed(http), 10, "the job list") == [job_id], "the job is listed again at once"
        done = wait_for(lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                        and j, 300, "the job to finish")
        assert done["status"] == "succeeded", done["error"]
        assert [m["step"] for m in http.get(f"/v1/jobs/{job_id}/metrics").json()] == [1, 2, 3], "each step once"


def test_a_killed_trainer_resumes_its_job_from_the_checkpoint(stack: Stack, tmp_path: Path,
                                                             redis_server: RedisServer) -> None:
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "speechrl.services.cli", "serve", "trainer", "--port", str(port),
           "--redis-url", redis_server.url, "--poll-seconds", "0.2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "trainer.log", "ab")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}/readyz"), 60, "the trainer service")
        return proc

    base = f"http://127.0.0.1:{port}"
    proc = start()
    try:
        job_id = httpx.post(f"{base}/v1/jobs", json=job_payload(stack, tmp_path / "killed", 4, redis_server.url)).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["step"] >= 2, 300, "two steps")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        done = wait_for(lambda: (j := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed")
                        and j, 300, "the resumed job")
        assert done["status"] == "succeeded", done["error"]
        steps = [m["step"] for m in httpx.get(f"{base}/v1/jobs/{job_id}/metrics").json()]
        assert steps == [1, 2, 3, 4], "each step recorded once: steps after the checkpoint ran again, not twice"
    finally:
        proc.kill()
        proc.wait()
        log.close()


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_lora_run_syncs_adapters_and_resumes(stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    out = tmp_path / "lora"
    config = job(stack, out, 2, redis_server.url)
    config = replace(config, grpo=replace(config.grpo, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2))
    with RolloutClient(stack.rollout) as rollout:
        before = rollout.get_service_status().policy_version
    recorder = Recorder()
    run_job("asr-grpo", config, recorder)
    assert [s for s, _ in recorder.steps] == [1, 2]
    assert_lora_merged(stack.policy, out, "step-000002")
    with RolloutClient(stack.rollout) as rollout:
        assert rollout.get_service_status().policy_version == before + 4  # base and adapter sync + 2 steps
    config.steps = 3
    resumed = Recorder()
    run_job("asr-grpo", config, resumed)
    assert [s for s, _ in resumed.steps] == [3]


def test_embedding_cache_encodes_an_utterance_once(stack: Stack) -> None:
    import asyncio

    from speechrl.client import AsyncAudioEncoderClient
    from speechrl.trainer.jobs.asr import EmbeddingCache
    from speechrl.trainer.jobs.datasets import read_manifest

    class CountingEncoder:
        def __init__(self, client: AsyncAudioEncoderClient) -> None:
            self.client, self.paths = client, list[str]()

        async def encode(self, paths: list[str]) -> Any:
            self.paths += paths
            return await self.client.encode(paths)

    rows = read_manifest(stack.manifest, "train")[:3]

    async def draws() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[str]]:
        async with AsyncAudioEncoderClient(stack.encoder) as client:
            encoder = CountingEncoder(client)
            services: Any = type("FakeServices", (), {"encoder": encoder})()
            cache = EmbeddingCache(max_items=2)
            first = await cache.encode(services, [rows[0], rows[1], rows[0]])
            again = await cache.encode(services, [rows[1], rows[0]])
            await cache.encode(services, [rows[2]])  # a third file: rows[1], the least recently drawn, goes
            evicted = await cache.encode(services, [rows[1], rows[2]])
            return first, again, evicted, encoder.paths

    first, again, evicted, sent = asyncio.run(draws())
    assert sent == [rows[0].audio, rows[1].audio, rows[2].audio, rows[1].audio], "each file once, until evicted"
    assert torch.equal(first[0], first[2]) and torch.equal(again[1], first[0]) and torch.equal(again[0], first[1])
    # Re-encoded in another batch: the same embeddings up to the float noise of a different batch shape.
    assert torch.allclose(evicted[0], first[1], rtol=1e-4, atol=1e-5), "re-encoding: the front-end is frozen"


def test_batch_by_split_draws_each_step_from_one_split() -> None:
    import random

    from speechrl.trainer.jobs.asr import draw_prompts
    from speechrl.trainer.jobs.datasets import Row

    rows = [Row(id=f"{split}-{i}", audio=f"/x/{split}-{i}.wav", text="a", voice="en-us", rate=160, duration=3.0,
                split=split) for split, n in (("rl", 12), ("rl_long", 4)) for i in range(n)]
    random.seed(0)
    draws = [draw_prompts(rows, 6, by_split=True) for _ in range(200)]
    assert all(len({r.split for r in d}) == 1 for d in draws)
    long_steps = sum(d[0].split == "rl_long" for d in draws)
    assert 25 <= long_steps <= 75, "a split is drawn in proportion to its rows (a quarter here)"
    assert {len(d) for d in draws} == {4, 6}, "a split smaller than the batch gives all its rows"
    assert len({r.split for r in draw_prompts(rows, 16)}) == 2
