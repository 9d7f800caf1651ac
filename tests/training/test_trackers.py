"""Experiment trackers through a real asr-grpo job: MLflow (its default sqlite store in the out_dir,
read back with MLflow's own client) and W&B offline (its run file read back record by record) get
the job's config as parameters, every step's metrics as metrics.jsonl has them, and summary.json and
the plot; a resumed job continues both runs. And the failures: a missing package, an unreachable
store, a log call that fails."""

from __future__ import annotations

import json
import logging
import math
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from speechrl.services.ports import free_port
from speechrl.trainer.jobs.registry import JobConfigError, parse_job, run_job
from speechrl.trainer.jobs.trackers import Trackers, TrackerUnavailable, TrackingConfig
from tests.support.servers import RedisServer
from tests.support.training import Recorder, Stack, asr_job, asr_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from asr_stack(tmp_path_factory.mktemp("trackers"))


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing reaches the network or the home folder: W&B offline with its folders under tmp_path, no
    MLflow server from the environment, no telemetry."""
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_both_trackers_get_the_config_every_step_and_the_files_and_a_resume_continues_them(
        stack: Stack, tmp_path: Path, redis_server: RedisServer) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    job = asr_job(stack, out, 2, redis_server.url)
    job.tracking = TrackingConfig(trackers=("mlflow", "wandb"))
    run_job("asr-grpo", job, Recorder())

    config = json.loads((out / "job.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    ids = json.loads((out / "trackers.json").read_text())

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert (run.info.status, run.info.run_name) == ("FINISHED", "run")
    assert run.data.params == {key: value if isinstance(value, str) else json.dumps(value)
                               for key, value in dotted(config).items()}
    assert run.data.params["grpo.learning_rate"] == "0.001" and run.data.params["kind"] == "asr-grpo"
    logged = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
              for key in run.data.metrics}
    assert logged == per_key(rows)
    assert "eval/wer" in logged and "time/update" in logged
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"training.png": (out / "training.png").stat().st_size,
                         "summary.json": (out / "summary.json").stat().st_size}

    [folder] = (out / "wandb").glob("offline-run-*")
    records = wandb_records(folder / f"run-{ids['wandb']}.wandb")
    [started] = [r.run for r in records if r.HasField("run")]
    assert started.run_id == ids["wandb"] and started.project == "asr-grpo" and started.display_name == "run"
    wandb_config = {item.key: json.loads(item.value_json) for item in started.config.update}
    wandb_config.pop("_wandb")
    assert wandb_config == config
    assert history(records) == [(row["step"], scalars(row)) for row in rows]
    uploaded = {f.path for r in records if r.HasField("files") for f in r.files.files}
    assert {"training.png", "summary.json"} <= uploaded
    assert (folder / "files" / "training.png").resolve() == (out / "training.png").resolve()
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]

    # Resumed from its step-2 checkpoint to step 3: the same MLflow run, and a W&B offline run of the same id.
    job.steps = 3
    run_job("asr-grpo", job, Recorder())
    assert json.loads((out / "trackers.json").read_text()) == ids
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["steps"] == "2", "MLflow keeps a param's first value"
    assert {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics} == per_key(rows)
    resumed = sorted((out / "wandb").glob("offline-run-*"))[-1]
    assert resumed != folder
    records = wandb_records(resumed / f"run-{ids['wandb']}.wandb")
    assert [r.run.run_id for r in records if r.HasField("run")] == [ids["wandb"]]
    assert history(records) == [(3, scalars(rows[2]))]


def test_a_missing_package_is_refused_when_the_job_is_read_and_when_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = TrackingConfig(trackers=("wandb",))  # made while wandb is there
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    hint = r"pip install 'speechrl-trainer\[trackers\]'"
    with pytest.raises(JobConfigError, match=rf"^tracking: trackers names wandb, whose package is not installed: {hint}"):
        parse_job({"kind": "asr-grpo", "policy": "p", "data": "d", "tracking": {"trackers": ["mlflow", "wandb"]}})
    with pytest.raises(TrackerUnavailable, match=rf"^wandb: cannot import it .*: {hint}"):
        Trackers.start(started, {"kind": "asr-grpo"}, tmp_path)
    with pytest.raises(ValueError, match=r"trackers names 'tensorboard'; known: mlflow, wandb"):
        TrackingConfig(trackers="mlflow,tensorboard")


def test_an_unreachable_store_fails_the_start_and_a_failed_log_call_is_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    first = tmp_path / "first"
    first.mkdir()
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackerUnavailable, match=rf"^mlflow: cannot start a run at {nowhere}"):
        Trackers.start(TrackingConfig(trackers=("wandb", "mlflow"), mlflow_tracking_uri=nowhere),
                       {"kind": "asr-grpo"}, first)
    [folder] = (first / "wandb").glob("offline-run-*")
    records = wandb_records(next(folder.glob("run-*.wandb")))
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1], "the W&B run ends as failed"
    assert not (first / "trackers.json").exists()

    # Once running, a failed log call is a warning; the next step logs again.
    second = tmp_path / "second"
    second.mkdir()
    trackers = Trackers.start(TrackingConfig(trackers=("mlflow",)), {"kind": "asr-grpo"}, second)
    [tracker] = trackers.running.values()
    calls = {"n": 0}
    log_batch = tracker.client.log_batch  # type: ignore[attr-defined]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("store went away")
        return log_batch(*args, **kwargs)

    tracker.client.log_batch = flaky  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="speechrl.trainer.jobs.trackers"):
        trackers.log_metrics(1, {"kl": 0.1})
        trackers.log_metrics(2, {"kl": 0.2, "note": "not a number", "wer": math.nan})
    assert [r.getMessage() for r in caplog.records if r.name == "speechrl.trainer.jobs.trackers"] == ["mlflow: step 1 was not logged (store went away); training goes on, metrics.jsonl has it"]
    trackers.finish([])
    client = MlflowClient(tracking_uri=f"sqlite:///{second / 'mlflow.db'}")
    run = client.get_run(json.loads((second / "trackers.json").read_text())["mlflow"])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "kl")] == [(2, 0.2)]
    assert set(run.data.metrics) == {"kl"} and run.info.status == "FINISHED"


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl row's finite numbers, its step left out."""
    return {key: value for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}


def per_key(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of metrics.jsonl's rows."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in scalars(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"grpo": {"kl_beta": 0}} -> {"grpo.kl_beta": 0}; an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def history(records: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """Each history record of a W&B run as (step, {metric: value}), W&B's own keys (_runtime, ...) left out."""
    steps = []
    for record in records:
        if record.HasField("history"):
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            assert items["_step"] == record.history.step.num
            steps.append((items["_step"], {k: v for k, v in items.items() if not k.startswith("_")}))
    return steps


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (`run-<id>.wandb`): W&B's 7-byte header (":W&B", 0xBEE1, version),
    then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte header (CRC, length, type: 1 full,
    2 first, 3 middle, 4 last) and its bytes, a record being one wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding (a preallocated or torn tail)
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
