"""/v1/dashboard: the JSON the dashboard page (/ui) polls, one route per panel, and the job proxy.

The page is `routes/ui.py`; what these routes read is gathered by `gateway/dashboard/`. Every route
here needs the gateway's bearer token when it has tokens, like the scoring routes; only
/v1/dashboard/auth is open, so the page can tell whether to ask for one before it calls the others.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from speechrl.services.gateway.dashboard import Sources
from speechrl.services.gateway.dashboard.jobs import TrainerError, TrainerProxy
from speechrl.services.gateway.dashboard.lease import lease_view
from speechrl.services.gateway.dashboard.services import RATE_WINDOW_S, read_services
from speechrl.services.gateway.dashboard.sources import STATUS_TIMEOUT_S
from speechrl.services.gateway.schemas.dashboard import (
    AuthInfo,
    CancelBody,
    JobDetailOut,
    JobOut,
    JobsOut,
    LeaseOut,
    ServiceOut,
    ServicesOut,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"])
AUTH_PATH = "/v1/dashboard/auth"  # open: main.py adds it to the middleware's open paths

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$", examples=["20250611-101500-a1b2c3"])]
TRAINER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such job."},
    502: {"description": "The trainer refused the gateway's token (set scorer_token)."},
    503: {"description": "No trainer configured, or it does not answer."},
}


async def get_sources(request: Request) -> Sources:
    return request.app.state.dashboard  # type: ignore[no-any-return]


SourcesDep = Annotated[Sources, Depends(get_sources)]


async def get_trainer(sources: SourcesDep) -> TrainerProxy:
    if sources.trainer is None:
        raise HTTPException(503, "no trainer configured on this gateway (set SPEECHRL_GATEWAY_TRAINER)")
    return sources.trainer


TrainerDep = Annotated[TrainerProxy, Depends(get_trainer)]


@router.get("/auth", summary="Whether the dashboard's routes need a bearer token (open)")
async def auth(request: Request) -> AuthInfo:
    return AuthInfo(token_required=request.app.state.tokens.enabled)


@router.get("/services", summary="Health, status, throughput and latency of every service the gateway knows")
async def services(sources: SourcesDep) -> ServicesOut:
    readings = await read_services(sources.status, sources.scrape, sources.metrics, sources.windows, STATUS_TIMEOUT_S)
    out = []
    for r in readings:
        status = {k: v for k, v in asdict(r.status).items() if k != "device_memory"} if r.status else {}
        out.append(ServiceOut.model_validate({"name": r.name, "health": r.health, "error": r.error,
                                              "queue_depth": r.queue_depth, **status, **r.rates}))
    return ServicesOut(services=out, window_s=RATE_WINDOW_S)


@router.get("/lease", summary="Per device: holders over the window (Gantt), queue, wait / hold percentiles, ledger")
async def lease(sources: SourcesDep, window_s: Annotated[float, Query(ge=10, le=3600)] = 300) -> LeaseOut:
    if sources.lease is None or sources.ledger is None:
        return LeaseOut(now_ms=0, since_ms=0, devices=[], error="no Redis configured (set SPEECHRL_GATEWAY_REDIS_URL)")
    try:
        return LeaseOut.model_validate(await lease_view(sources.lease, sources.ledger, window_s))
    except redis.RedisError as exc:
        return LeaseOut(now_ms=0, since_ms=0, devices=[], error=f"Redis unreachable: {type(exc).__name__}: {exc}")


@router.get("/jobs", summary="The trainer's jobs, newest first")
async def jobs(sources: SourcesDep) -> JobsOut:
    if sources.trainer is None:
        return JobsOut(jobs=[], error="no trainer configured (set SPEECHRL_GATEWAY_TRAINER)")
    try:
        return JobsOut.model_validate({"jobs": await sources.trainer.jobs()})
    except TrainerError as exc:
        return JobsOut(jobs=[], error=exc.detail)


@router.get("/jobs/{job_id}", summary="One job, its device memory and checkpoints", responses=TRAINER_ERRORS)
async def job(job_id: JobId, trainer: TrainerDep) -> JobDetailOut:
    try:
        return JobDetailOut.model_validate({**await trainer.job(job_id), "checkpoints": await trainer.checkpoints(job_id)})
    except TrainerError as exc:
        raise HTTPException(exc.status, exc.detail) from None


@router.get("/jobs/{job_id}/metrics", summary="A job's plotted metrics per step, after since_step",
            responses=TRAINER_ERRORS)
async def job_metrics(job_id: JobId, trainer: TrainerDep,
                      since_step: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, float]]:
    """Rows of `step`, `reward_mean`, `reward/*`, `wer`, `insertions`, `kl`, `clip_fraction`, `time/*`."""
    try:
        return await trainer.metrics(job_id, since_step)
    except TrainerError as exc:
        raise HTTPException(exc.status, exc.detail) from None


@router.post("/jobs/{job_id}/cancel", summary="Stop a job after its current step (it keeps its checkpoints)",
             responses={**TRAINER_ERRORS, 415: {"description": "The body is not application/json."}})
async def cancel(job_id: JobId, body: CancelBody, request: Request, trainer: TrainerDep) -> JobOut:
    # A JSON body makes a cross-site request preflighted, and the gateway allows no other origin.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the cancel as application/json, e.g. {}")
    log.info("dashboard: cancel of job %s asked for%s", job_id, f" ({body.reason})" if body.reason else "")
    try:
        return JobOut.model_validate(await trainer.cancel(job_id))
    except TrainerError as exc:
        raise HTTPException(exc.status, exc.detail) from None
