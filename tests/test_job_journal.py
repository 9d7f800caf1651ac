"""The trainer's job journal: a job's record replaced whole, its metrics appended a line per step,
and what Redis forgot put back from it (a private Redis: these tests flush it)."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from speechrl.trainer.jobs import JobStore
from speechrl.trainer.journal import JobJournal
from tests.conftest import RedisServer


def test_metrics_are_appended_trimmed_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path)
    journal.save_record("j", {"id": "j", "created": 1.0, "step": 0})
    for step in (1, 2, 3):
        journal.append_metrics("j", {"step": step, "loss": 0.1 * step})
    metrics_file = tmp_path / "j.metrics.jsonl"
    assert len(metrics_file.read_text().splitlines()) == 3  # one line per step, earlier ones untouched
    with metrics_file.open("a") as out:
        out.write('{"step": 4, "lo')  # a trainer killed mid-append
    assert [r["step"] for r in journal.metrics("j")] == [1, 2, 3]
    journal.trim_metrics("j", last_step=2)
    record, rows = journal.load("j")  # type: ignore[misc]
    assert record["id"] == "j" and [r["step"] for r in rows] == [1, 2]
    assert [e[0]["id"] for e in journal.all()] == ["j"]  # the metrics file is not taken for a job
    journal.remove("j")
    assert journal.load("j") is None and not metrics_file.exists()


def test_a_flushed_redis_gets_the_job_and_its_trimmed_metrics_back(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    store = JobStore(client, journal=JobJournal(tmp_path / "journal"))
    job = store.submit("asr-grpo", {"steps": 3}, str(tmp_path / "out"), total_steps=3)
    for step in (1, 2, 3):
        store.record_step(job.id, step, {"loss": float(step)})
    store.trim_metrics(job.id, last_step=2)  # a resume from the step-2 checkpoint
    store.update(job.id, status="running")
    client.flushall()  # a Redis restart without persistence
    restored = store.get(job.id)
    assert (restored.status, restored.step) == ("running", 3)
    assert [(r["step"], r["loss"]) for r in store.metrics(job.id)] == [(1, 1.0), (2, 2.0)]
    saved = json.loads((tmp_path / "journal" / f"{job.id}.json").read_text())
    assert "metrics" not in saved  # the record file stays small: metrics live in their own file
