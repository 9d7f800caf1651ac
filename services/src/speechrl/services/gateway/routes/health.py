"""Operations endpoints: liveness, readiness of the scorers, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from speechrl.services.gateway.deps import ConfigDep, ScorersDep

router = APIRouter(tags=["operations"])


class Liveness(BaseModel):
    """The process is up."""

    status: str = Field(default="ok", examples=["ok"])


class ScorerReadiness(BaseModel):
    """One scorer: ready when any of its endpoints answers grpc.health.v1 SERVING."""

    ready: bool
    endpoints: dict[str, str] = Field(description="Health state per endpoint, or the gRPC status of the failed check.",
                                      examples=[{"127.0.0.1:50053": "SERVING"}])


class Readiness(BaseModel):
    """Whether every configured scorer can take requests."""

    ready: bool
    detail: str = Field(examples=["not ready: speaker"])
    scorers: dict[str, ScorerReadiness]


@router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> Liveness:
    return Liveness()


@router.get("/readyz", summary="Readiness: every configured scorer is SERVING",
            responses={503: {"model": Readiness, "description": "A scorer is down; `detail` names it."}})
async def readyz(scorers: ScorersDep, config: ConfigDep) -> JSONResponse:
    states = await scorers.health(config.health_timeout_s)
    report = {name: ScorerReadiness(ready="SERVING" in state.values(), endpoints=state) for name, state in states.items()}
    down = [name for name, r in report.items() if not r.ready]
    body = Readiness(ready=not down, detail=f"not ready: {', '.join(down)}" if down else "ready", scorers=report)
    return JSONResponse(body.model_dump(), status_code=503 if down else 200)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
