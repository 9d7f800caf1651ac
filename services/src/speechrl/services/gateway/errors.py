"""HTTP errors of the gateway, in one place: bad input (400), scorer failures (429/503/504/502).

Per-item problems are not errors here: they ride inside a 200 reply, as in the gRPC reply. These
handlers cover a request as a whole, and always say why and, where one field is at fault, which.
"""

from __future__ import annotations

import math
import re

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from speechrl.adapters.token2wav import Token2WavNotConfigured
from speechrl.client import ServiceError
from speechrl.services.gateway.inflight import TooBusy

# gRPC status of a failed scorer call -> HTTP status of the gateway's reply.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 502,  # the gateway's own credentials were refused: not the caller's fault
    grpc.StatusCode.PERMISSION_DENIED: 502,
}

# The servers' INVALID_ARGUMENT messages begin with the field at fault, "items[2].audio: ...".
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class ErrorResponse(BaseModel):
    """Why a request failed as a whole."""

    detail: str = Field(description="The reason, in words.", examples=["items[0].audio_base64: not valid base64"])
    field: str | None = Field(default=None, description="The request field at fault, when one is.", examples=["items[0].audio_base64"])
    grpc_code: str | None = Field(default=None, description="The scorer's gRPC status, when a scorer refused or failed.",
                                  examples=["INVALID_ARGUMENT"])


# For the OpenAPI docs of every scoring route.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "The request or one of its fields is malformed."},
    429: {"model": ErrorResponse, "description": "The scorer is overloaded; retry after the Retry-After header."},
    503: {"model": ErrorResponse, "description": "The scorer is down or not configured."},
    504: {"model": ErrorResponse, "description": "The scorer did not answer within the gateway's deadline."},
}


class BadRequest(Exception):
    """A field of the HTTP request that the gateway itself cannot use (e.g. bad base64): 400."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ScorerOff(Exception):
    """A route of a scorer that this gateway has no endpoints for: 503."""

    def __init__(self, scorer: str):
        super().__init__(f"the {scorer} scorer is not configured on this gateway (set SPEECHRL_GATEWAY_{scorer.upper()})")


def _body(detail: str, field: str | None = None, grpc_code: str | None = None) -> dict[str, str | None]:
    return ErrorResponse(detail=detail, field=field, grpc_code=grpc_code).model_dump()


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadRequest)
    return JSONResponse(_body(str(exc), exc.field), status_code=400)


async def _scorer_off(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body(str(exc)), status_code=503)


def service_error_response(exc: ServiceError) -> JSONResponse:
    """The HTTP reply of a scorer call that failed as a whole."""
    status = HTTP_STATUS.get(exc.code, 502)
    match = _FIELD_PREFIX.match(exc.details) if exc.code == grpc.StatusCode.INVALID_ARGUMENT else None
    headers = {}
    if status == 429:
        # Retry-After takes whole seconds; round the scorer's millisecond hint up, at least 1.
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s or 1.0)))
    # The caller's own mistakes read as the scorer wrote them; failures say where and after how many tries.
    detail = exc.details if status in (400, 404, 409) else (
        f"{exc.code.name} from scorer {exc.endpoint} after {exc.attempts} attempt(s): {exc.details}")
    return JSONResponse(_body(detail, match.group(1) if match else None, exc.code.name), status_code=status,
                        headers=headers)


async def _too_busy(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TooBusy)
    return JSONResponse(_body(str(exc)), status_code=429, headers={"Retry-After": str(exc.retry_after_s)})


async def _token2wav_missing(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body(str(exc)), status_code=503)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return service_error_response(exc)


def add_error_handlers(app: FastAPI) -> None:
    """Install the gateway's exception -> HTTP reply mapping."""
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(ScorerOff, _scorer_off)
    app.add_exception_handler(ServiceError, _service_error)
    # The trainer-protocol routes' own refusals (routes/openrlhf.py, routes/triton.py).
    app.add_exception_handler(TooBusy, _too_busy)
    app.add_exception_handler(Token2WavNotConfigured, _token2wav_missing)
