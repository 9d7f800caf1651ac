"""The trainer's job journal: a job's record replaced whole, its metrics appended a line per step,
and what Redis forgot put back from it (a private Redis: these tests flush it)."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from speechrl.trainer.jobs.journal import JobJournal
from speechrl.trainer.jobs.store import JobStore
from tests.support.servers import RedisServer


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
    store.rewind(job.id, 2)  # a resume from the step-2 checkpoint
    store.update(job.id, status="running")
    client.flushall()  # a Redis restart without persistence
    restored = store.get(job.id)
    assert (restored.status, restored.step) == ("running", 2)
    assert [(r["step"], r["loss"]) for r in store.metrics(job.id)] == [(1, 1.0), (2, 2.0)]
    saved = json.loads((tmp_path / "journal" / f"{job.id}.json").read_text())
    assert "metrics" not in saved  # the record file stays small: metrics live in their own file


def test_a_job_resumed_from_its_checkpoint_records_each_step_once(redis_server: RedisServer, tmp_path: Path) -> None:
    """An attempt killed after reporting step 3 but before writing its checkpoint: the resumed run
    repeats step 3 from the step-2 checkpoint, and the job's record keeps only the repeat."""
    import asyncio

    import torch

    from speechrl.trainer.jobs.checkpoint import TrainState, latest_checkpoint
    from speechrl.trainer.jobs.driver import train_loop
    from speechrl.trainer.jobs.service import StoreProgress

    store = JobStore(redis.Redis.from_url(redis_server.url), journal=JobJournal(tmp_path / "journal"))
    out = tmp_path / "out"
    out.mkdir()
    job = store.submit("asr-grpo", {"steps": 4}, str(out), total_steps=4)
    progress = StoreProgress(store, job.id)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    counter_at_step: dict[int, int] = {}

    async def step(done: int, version: int) -> tuple[dict[str, float], int]:
        counter_at_step[done + 1] = store.get(job.id).step
        return {"loss": float(done + 1)}, version

    def save_policy(folder: Path) -> None:
        (folder / "weights").write_text("w")

    def run(state: TrainState, steps: int) -> None:
        asyncio.run(train_loop(out, state, steps, progress, step, save_policy, optimizer, version=0, checkpoint_every=1))

    run(TrainState(), 2)
    progress.report(3, 4, {"loss": -1.0})  # the killed attempt's step 3, never checkpointed
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and checkpoint.name == "step-000002"
    run(TrainState.load(checkpoint), 4)
    assert counter_at_step[3] == 2, "while step 3 runs again, the job shows the checkpoint's step"
    assert [(r["step"], r["loss"]) for r in store.metrics(job.id)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert store.get(job.id).step == 4
