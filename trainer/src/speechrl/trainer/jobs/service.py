"""The trainer service: an HTTP job API over the same runner as `speechrl train`.

    POST /v1/jobs                  submit a job (JSON, or YAML with content-type application/yaml)
    GET  /v1/jobs                  list jobs, newest first
    GET  /v1/jobs/{id}             one job's status and progress
    GET  /v1/jobs/{id}/metrics     its per-step metrics (?since_step=N for the new ones)
    GET  /v1/jobs/{id}/checkpoints its complete checkpoints (step, folder, fence), oldest first
    POST /v1/jobs/{id}/cancel      stop it after the current step (it keeps its checkpoints)
    GET  /healthz, /readyz         liveness; readiness = Redis answers
    GET  /metrics                  Prometheus: jobs finished by status, steps, the jobs' GPU lease

Jobs live in Redis (jobs.py), so a restarted trainer finds them: jobs it was running are queued
again and resume from their newest checkpoint. The trainer also journals its jobs to files
(journal.py) and puts them back when Redis restarts without its data. One worker thread runs one job at a time (the
update owns the trainer's device); run one trainer per device pool.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import redis
import yaml
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.concurrency import run_in_threadpool

from speechrl.services.auth import BearerAuthMiddleware, TokenStore
from speechrl.services.config import ListenerConfig, option, parse_config
from speechrl.services.ledger import ledger_devices, read_ledger
from speechrl.services.logs import RequestIdMiddleware, configure_logging
from speechrl.services.ports import DEFAULT_PORTS
from speechrl.trainer.jobs.checkpoint import STATE_FILE, TrainState, checkpoint_dir
from speechrl.trainer.jobs.driver import with_lease_prefix
from speechrl.trainer.jobs.journal import JobJournal, journal_folder
from speechrl.trainer.jobs.registry import JobConfigError, parse_job, run_job
from speechrl.trainer.jobs.store import Job, JobNotFound, JobStore

log = logging.getLogger(__name__)

JOBS = Counter("speechrl_trainer_jobs_total", "Jobs this trainer finished, by final status", ["status"])
for _status in ("succeeded", "failed", "cancelled"):
    JOBS.labels(_status)  # exported at 0 from the start, so that increase() counts the first failure
STEPS = Counter("speechrl_trainer_steps_total", "Training steps completed by this trainer's jobs")


@dataclass
class TrainerConfig(ListenerConfig):
    """Settings of the trainer service."""

    port: int = option(DEFAULT_PORTS["trainer"], "HTTP port of the job API.")
    redis_url: str = option("redis://127.0.0.1:6379/0", "Redis holding the jobs (persist it: appendonly yes).")
    journal_dir: str = option("runs/jobs", "Folder of the trainer's own copy of its jobs (one sub-folder per Redis), "
                                           "re-published when Redis lost its data; empty: no journal.")
    poll_seconds: float = option(1.0, "How long the worker waits on the queue before checking for shutdown.")
    lease_prefix: str = option("", "Prefix of the lease a job on a GPU takes by default (lease_device auto): "
                                   "<prefix>cuda:0. Kubernetes sets <node name>/, the name the model services "
                                   "on the node lease, since every pod calls its GPU cuda:0.")


class StoreProgress:
    """Progress of a job as the service records it: per-step metrics into Redis, cancel from Redis."""

    def __init__(self, store: JobStore, job_id: str):
        self.store = store
        self.job_id = job_id

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.store.record_step(self.job_id, step, metrics)
        STEPS.inc()

    def resumed(self, step: int) -> None:
        self.store.rewind(self.job_id, step)

    def cancelled(self) -> bool:
        return self.store.cancel_requested(self.job_id)  # a Redis outage does not stop the job


class Worker:
    """Runs queued jobs one at a time in a background thread."""

    def __init__(self, store: JobStore, poll_seconds: float, lease_prefix: str = ""):
        self.store = store
        self.poll_seconds = poll_seconds
        self.lease_prefix = lease_prefix
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="trainer-worker", daemon=True)

    def start(self) -> None:
        for job_id in self.store.requeue_interrupted():
            log.info("job %s was running when the trainer stopped: queued to resume", job_id)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                job_id = self.store.next_queued(self.poll_seconds)
            except redis.RedisError as exc:
                log.warning("job queue unreachable (%s); retrying", exc)
                self.stopping.wait(self.poll_seconds)
                continue
            if job_id is not None:
                self.run(job_id)

    def run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.status != "queued":
            return
        self.store.update(job_id, status="running", error="")
        try:
            kind, config = parse_job({"kind": job.kind, **job.config})
            run_job(kind, with_lease_prefix(config, self.lease_prefix), StoreProgress(self.store, job_id))
            final = "cancelled" if self.store.cancel_requested(job_id) else "succeeded"
            self.store.update(job_id, status=final)
            JOBS.labels(final).inc()
        except Exception as exc:
            log.exception("job %s failed", job_id)
            JOBS.labels("failed").inc()
            self.store.update(job_id, status="failed", error=f"{type(exc).__name__}: {exc}\n"
                              + "".join(traceback.format_exc(limit=5)))


def device_memory(job: Job) -> list[dict[str, Any]]:
    """This trainer's entries of the device-memory ledger (its update runs in this process), from the job's Redis."""
    owner = f"trainer-{os.getpid()}"
    client = redis.Redis.from_url(str(job.config.get("redis_url", "redis://127.0.0.1:6379/0")), socket_timeout=2)
    try:
        return [asdict(entry) for device in ledger_devices(client) for entry in read_ledger(client, device)
                if entry.owner == owner]
    except redis.RedisError:
        return []
    finally:
        client.close()


def checkpoints(job: Job) -> list[dict[str, Any]]:
    """The job's complete checkpoints in its out_dir (the trainer's files: the job API is where others see them)."""
    found = []
    for folder in sorted(checkpoint_dir(job.out_dir).glob("step-*")) if job.out_dir else []:
        try:
            state = TrainState.load(folder)
            written = (folder / STATE_FILE).stat().st_mtime
        except (OSError, ValueError):  # being replaced right now, or not a checkpoint
            continue
        found.append({"step": state.step, "path": str(folder), "fence": state.fence, "written": written})
    return found


async def get_store(request: Request) -> JobStore:
    return request.app.state.store  # type: ignore[no-any-return]


StoreDep = Annotated[JobStore, Depends(get_store)]


def create_app(config: TrainerConfig, start_worker: bool = True) -> FastAPI:
    """The job API for config; the worker starts with the app."""
    folder = journal_folder(config.journal_dir, config.redis_url, "speechrl:jobs")
    store = JobStore(redis.Redis.from_url(config.redis_url), journal=JobJournal(folder) if folder else None)
    worker = Worker(store, config.poll_seconds, config.lease_prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_worker:
            worker.start()
        yield
        worker.stopping.set()

    app = FastAPI(title="SpeechRL trainer", lifespan=lifespan,
                  description="Submit, watch and cancel GRPO training jobs; the same job files as `speechrl train`.")
    app.state.store = store
    app.state.worker = worker
    app.add_middleware(BearerAuthMiddleware, store=TokenStore(config.auth_tokens, config.auth_token_file))
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(JobNotFound)
    async def not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc.args[0]!r}"}, status_code=404)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"job store unavailable: {exc}"}, status_code=503, headers={"Retry-After": "5"})

    @app.post("/v1/jobs", status_code=201, summary="Submit a training job")
    async def submit(request: Request, store: StoreDep) -> dict[str, Any]:
        body = await request.body()
        try:
            values = yaml.safe_load(body) if body else None  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            raise HTTPException(400, f"body: not YAML or JSON: {exc}") from None
        if not isinstance(values, dict):
            raise HTTPException(400, "body: a job is a mapping with `kind` and its config fields")
        try:
            kind, job_config = parse_job(values)
        except JobConfigError as exc:
            raise HTTPException(400, str(exc)) from None
        fields = asdict(job_config)
        job = await run_in_threadpool(store.submit, kind, fields, fields.get("out_dir", ""), int(fields.get("steps", 0)))
        return job.to_json()

    # The store's Redis calls and journal files block: routes that use it are plain functions, which
    # FastAPI runs in its thread pool, so a slow store never stalls the event loop.
    @app.get("/v1/jobs", summary="List jobs, newest first")
    def list_jobs(store: StoreDep) -> list[dict[str, Any]]:
        return [job.to_json() for job in store.list()]

    @app.get("/v1/jobs/{job_id}", summary="One job's status and progress, and what it holds on its devices")
    def get_job(job_id: str, store: StoreDep) -> dict[str, Any]:
        job = store.get(job_id)
        return {**job.to_json(), "device_memory": device_memory(job) if job.status == "running" else []}

    @app.get("/v1/jobs/{job_id}/metrics", summary="Per-step metrics of a job")
    def job_metrics(job_id: str, store: StoreDep, since_step: int = 0) -> list[dict[str, Any]]:
        store.get(job_id)
        return store.metrics(job_id, since_step)

    @app.get("/v1/jobs/{job_id}/checkpoints", summary="A job's complete checkpoints, oldest first")
    def job_checkpoints(job_id: str, store: StoreDep) -> list[dict[str, Any]]:
        return checkpoints(store.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", summary="Stop a job after its current step")
    def cancel(job_id: str, store: StoreDep) -> dict[str, Any]:
        job: Job = store.request_cancel(job_id)
        return job.to_json()

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the job store answers")
    def readyz(store: StoreDep) -> dict[str, str]:
        store.client.ping()
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    config = parse_config(TrainerConfig, "trainer", argv, description=__doc__)
    configure_logging(config.log_format)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info",
                access_log=False)  # speechrl.access logs each request with its request id instead
