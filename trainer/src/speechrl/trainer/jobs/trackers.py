"""Experiment trackers: a job's config, per-step metrics and final files in MLflow and W&B, when asked.

metrics.jsonl and TensorBoard get every step of every job (progress.MetricsLog). A job whose
`tracking.trackers` names mlflow and / or wandb also logs there, from the process that writes
metrics.jsonl (rank 0 under torchrun):

    start     the job's config (job.json) as the run's parameters: MLflow params flattened
              (`grpo.learning_rate`), the W&B run's config nested (W&B shows it flattened)
    per step  the step's finite numbers as metrics.jsonl has them, under its names (what TensorBoard
              gets); MLflow names outside its charset get `_` for the odd characters (`reward/wer` is fine)
    finish    summary.json and training.png as the run's files; the run ends (FAILED when the job did)

Failures never pass silently and never kill a run at random. A tracker whose package is missing is
refused when the job is read (TrackingConfig, so the job API answers 400); one that cannot start a
run (an unreachable MLflow server, no W&B login for online mode) fails the job before its first step
with TrackerUnavailable naming the tracker. Once the run is going, a failed log call or upload is a
warning and training goes on: metrics.jsonl still has every step.

Resume: each tracker's run id is kept in <out_dir>/trackers.json, and a resumed job continues that
run (MLflow: the same run, when its store still has it, else a new run with a warning naming both;
W&B: the same run id, resume "allow"; offline, a second offline-run folder with that id, which
`wandb sync` appends to the same run). Steps that an interrupted attempt logged past its checkpoint
stay in the tracker (metrics.jsonl and TensorBoard drop them): MLflow then holds both values of such
a step, W&B keeps the first (it drops steps it has passed). MLflow params cannot change; a resumed job whose
config changed keeps the first values there, with a warning (the new ones are in job.json and W&B).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from speechrl.services.config import check_choices, option
from speechrl.trainer.jobs.progress import scalars

log = logging.getLogger(__name__)

RUN_IDS_FILE = "trackers.json"  # {"mlflow": run id, "wandb": run id}: what a resumed job continues
INSTALL = "pip install 'speechrl-trainer[trackers]'"


class TrackerUnavailable(RuntimeError):
    """A tracker the job asks for cannot start its run: its package is missing or its store unreachable."""


@dataclass
class TrackingConfig:
    """Experiment trackers a job logs to besides metrics.jsonl and TensorBoard (none by default), and
    their settings. In a job file: `tracking: {trackers: [mlflow, wandb], wandb_mode: offline}`."""

    trackers: tuple[str, ...] = option((), "Trackers to log to: mlflow, wandb (the speechrl-trainer[trackers] "
                                           "extra); empty: none.")
    run_name: str = option("", "The run's name in every tracker; empty: the out_dir's folder name.")
    mlflow_tracking_uri: str = option("", "MLflow store: a server (http://...) or sqlite:///PATH. Empty: "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db with the "
                                          "artifacts in <out_dir>/mlartifacts.")
    mlflow_experiment: str = option("", "MLflow experiment, created when missing; empty: the job's kind (asr-grpo).")
    wandb_project: str = option("", "W&B project; empty: the job's kind.")
    wandb_entity: str = option("", "W&B team or user; empty: the account's default.")
    wandb_mode: Literal["", "online", "offline", "disabled"] = option(
        "", "W&B mode. Empty: $WANDB_MODE, else online (needs `wandb login` or WANDB_API_KEY); offline writes the "
            "run under wandb_dir for a later `wandb sync`.")
    wandb_dir: str = option("", "Folder W&B writes its run folders in (<wandb_dir>/wandb/); empty: out_dir.")

    def __post_init__(self) -> None:
        check_choices(self)
        if isinstance(self.trackers, str):  # one name, or a comma-separated list
            self.trackers = tuple(name.strip() for name in self.trackers.split(",") if name.strip())
        self.trackers = tuple(self.trackers)
        for name in self.trackers:
            if name not in STARTERS:
                raise ValueError(f"trackers names {name!r}; known: {', '.join(STARTERS)}")
            if importlib.util.find_spec(name) is None:  # the import itself costs seconds: the run does it
                raise ValueError(f"trackers names {name}, whose package is not installed: {INSTALL}")


@dataclass
class RunSpec:
    """What every tracker's run is given."""

    kind: str  # the job's kind: the default MLflow experiment and W&B project
    config: Mapping[str, Any]  # the job's config as job.json has it
    out: Path  # the job's out_dir
    name: str  # the run's name


class Tracker(Protocol):
    """One tracker's run."""

    run_id: str

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def finish(self, files: Sequence[Path], failed: bool) -> None:
        """Upload files (those that exist) and end the run."""
        ...


class Trackers:
    """The trackers of one job (none: every call does nothing).

    >>> trackers = Trackers.start(TrackingConfig(), {"kind": "asr-grpo"}, Path("runs/x"))
    >>> trackers.log_metrics(1, {"reward_mean": 0.5})
    >>> trackers.finish([Path("runs/x/summary.json")])
    """

    def __init__(self, running: Mapping[str, Tracker] | None = None):
        self.running = dict(running or {})

    @classmethod
    def start(cls, config: TrackingConfig, job: Mapping[str, Any], out: Path) -> Trackers:
        """Start (or, resuming, continue) a run in each of config.trackers; TrackerUnavailable when one cannot."""
        if not config.trackers:
            return cls()
        ids_file = out / RUN_IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
        spec = RunSpec(kind=str(job.get("kind", "job")), config=job, out=out, name=config.run_name or out.resolve().name)
        started = cls()
        try:
            for name in config.trackers:
                started.running[name] = STARTERS[name](config, spec, ids.get(name))
        except BaseException:
            started.finish([], failed=True)  # the runs already started end as failed
            raise
        ids_file.write_text(json.dumps({**ids, **{n: t.run_id for n, t in started.running.items()}}, indent=2) + "\n")
        return started

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log a step's finite numbers; a tracker that fails is a warning (metrics.jsonl has the step)."""
        if not self.running:
            return
        values = scalars(metrics)
        for name, tracker in self.running.items():
            try:
                tracker.log_metrics(step, values)
            except Exception as exc:  # noqa: BLE001 - a tracker is reporting, never a reason to stop training
                log.warning("%s: step %d was not logged (%s); training goes on, metrics.jsonl has it", name, step, exc)

    def finish(self, files: Sequence[Path], failed: bool = False) -> None:
        """Upload files to every run and end it; a tracker that fails is a warning (out_dir has the files)."""
        for name, tracker in self.running.items():
            try:
                tracker.finish(files, failed)
            except Exception as exc:  # noqa: BLE001 - the job's outcome is decided; its files are in out_dir
                log.warning("%s: could not upload %s or end run %s (%s)", name, [f.name for f in files],
                            tracker.run_id, exc)
        self.running.clear()


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; an empty section stays a value.

    >>> flatten({"steps": 2, "grpo": {"learning_rate": 0.001, "reward_weights": {}}})
    {'steps': 2, 'grpo.learning_rate': 0.001, 'grpo.reward_weights': {}}
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_value(value: Any) -> str:
    """An MLflow param's text: a string as it is, anything else as JSON (`0.001`, `true`, `["q_proj"]`)."""
    return value if isinstance(value, str) else json.dumps(value)


class MlflowRun:
    """A run in an MLflow store, through MlflowClient (no global active run: the trainer service runs job
    after job in one process)."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, config: TrackingConfig, spec: RunSpec, run_id: str | None) -> MlflowRun:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackerUnavailable(f"mlflow: cannot import it ({exc}): {INSTALL}") from exc
        given = config.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        uri = given or f"sqlite:///{(spec.out / 'mlflow.db').resolve()}"
        try:
            client = MlflowClient(tracking_uri=uri)
            run = _active_run(client, run_id) if run_id else None
            if run is not None:
                client.update_run(run.info.run_id, status="RUNNING")
                log.info("mlflow: continuing run %s at %s", run_id, uri)
            else:
                run = cls._create_run(client, config, spec, local=not given)
                if run_id:
                    log.warning("mlflow: run %s of this out_dir is not in %s; logging to a new run %s", run_id, uri,
                                run.info.run_id)
            tracker = cls(client, run.info.run_id)
            tracker.log_params(spec.config, run.data.params)
            return tracker
        except Exception as exc:
            raise TrackerUnavailable(f"mlflow: cannot start a run at {uri}: {exc}") from exc

    @staticmethod
    def _create_run(client: Any, config: TrackingConfig, spec: RunSpec, local: bool) -> Any:
        name = config.mlflow_experiment or spec.kind
        experiment = client.get_experiment_by_name(name)
        # The sqlite store's default artifact root is ./mlruns in the working directory: a local store in
        # the out_dir keeps its artifacts beside it instead.
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
            name, artifact_location=(spec.out / "mlartifacts").resolve().as_uri() if local else None)
        return client.create_run(experiment_id, run_name=spec.name, tags={"speechrl.out_dir": str(spec.out)})

    def log_params(self, config: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        """The config as params; on a continued run only the new keys (MLflow params cannot change)."""
        from mlflow.entities import Param

        params = {key: param_value(value) for key, value in flatten(config).items()}
        changed = sorted(key for key in params if key in existing and existing[key] != params[key])
        if changed:
            log.warning("mlflow: run %s keeps its first values of %s (MLflow params cannot change); job.json has "
                        "the new ones", self.run_id, ", ".join(changed))
        new = [Param(key, value) for key, value in params.items() if key not in existing]
        for start in range(0, len(new), 100):  # MLflow's limit of params per batch
            self.client.log_batch(self.run_id, params=new[start:start + 100])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(re.sub(r"[^\w\-. /:]", "_", key), value, now, step) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's limit of metrics per batch
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def finish(self, files: Sequence[Path], failed: bool) -> None:
        try:
            for path in files:
                if path.exists():
                    self.client.log_artifact(self.run_id, str(path))
        finally:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _active_run(client: Any, run_id: str) -> Any:
    """The run run_id of client's store, or None when the store lacks it (another store) or it was deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST
        return None
    return run if run.info.lifecycle_stage == "active" else None


class WandbRun:
    """A W&B run of its own (reinit "create_new": no global run is touched)."""

    def __init__(self, run: Any):
        self.run = run
        self.run_id: str = run.id

    @classmethod
    def start(cls, config: TrackingConfig, spec: RunSpec, run_id: str | None) -> WandbRun:
        try:
            import wandb
        except ImportError as exc:
            raise TrackerUnavailable(f"wandb: cannot import it ({exc}): {INSTALL}") from exc
        try:
            run = wandb.init(project=config.wandb_project or spec.kind, entity=config.wandb_entity or None,
                             name=spec.name, dir=str(Path(config.wandb_dir or spec.out)),
                             mode=config.wandb_mode or None, config=dict(spec.config), id=run_id,
                             resume="allow" if run_id else None, allow_val_change=bool(run_id), reinit="create_new")
        except Exception as exc:
            raise TrackerUnavailable(f"wandb: cannot start a run ({exc}); for a run without a W&B login set "
                                     "tracking.wandb_mode (or WANDB_MODE) to offline") from exc
        if run_id:
            log.info("wandb: continuing run %s (offline: a new offline-run folder of the same id; `wandb sync` "
                     "appends it to the run)", run_id)
        return cls(run)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, files: Sequence[Path], failed: bool) -> None:
        try:
            for path in files:
                if path.exists():
                    self.run.save(str(path.resolve()), base_path=str(path.resolve().parent), policy="now")
        finally:
            self.run.finish(exit_code=1 if failed else 0)


# (settings, the run, the run id to continue or None) -> the started run.
STARTERS: dict[str, Callable[[TrackingConfig, RunSpec, str | None], Tracker]] = {
    "mlflow": MlflowRun.start,
    "wandb": WandbRun.start,
}
