"""/v2: the KServe v2 / Triton HTTP inference protocol in front of the scorers (models in v2_models.py).

A client written for Triton points at the gateway unchanged, e.g. CosyVoice's GRPO reward function
(examples/grpo/cosyvoice2/reward_tts.py) with REWARD_SERVER_URL = http://gateway:8000/v2/models/token2wav_asr/infer.
Errors use the protocol's body, `{"error": "..."}`: 400 a malformed request (naming the input),
404 an unknown model, 429 too many requests in flight (Retry-After), 503 a scorer that is down or
not configured or no token2wav backend, 504 a scorer past the gateway's deadline.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from speechrl.adapters.token2wav import Token2WavNotConfigured
from speechrl.client import ServiceError
from speechrl.services import __version__
from speechrl.services.gateway.deps import ConfigDep, Scorers, ScorersDep
from speechrl.services.gateway.errors import HTTP_STATUS, ScorerOff
from speechrl.services.gateway.inflight import TooBusy, limiter_of
from speechrl.services.gateway.kserve import (
    InferRequest,
    V2Error,
    binary_reply,
    output_tensor,
    parse_infer_request,
    tensor_bytes,
    wants_binary,
)
from speechrl.services.gateway.scoring import token2wav_of
from speechrl.services.gateway.v2_models import MODELS, Call, V2Model, check_inputs

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

_ERROR = {"content": {"application/json": {"example": {"error": "Request for unknown model: 'nope'"}}}}
_INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "description": "KServe v2 inference request: inputs [{name, shape, datatype, data}], "
                                                "optional outputs [{name}]; Triton's binary-tensor extension too."},
    "example": InferRequest.model_config["json_schema_extra"]["examples"][0]}}}}  # type: ignore[index]


def v2_error(exc: Exception) -> JSONResponse:
    """The protocol's error reply for an exception of the v2 routes."""
    headers: dict[str, str] = {}
    if isinstance(exc, V2Error):
        status, message, headers = exc.status, exc.message, exc.headers
    elif isinstance(exc, TooBusy):
        status, message, headers = 429, str(exc), {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, (ScorerOff, Token2WavNotConfigured)):
        status, message = 503, str(exc)
    elif isinstance(exc, ServiceError):
        status = HTTP_STATUS.get(exc.code, 502)
        message = f"{exc.code.name} from scorer {exc.endpoint}: {exc.details}"
        if status == 429:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s or 1.0)))
    else:
        raise exc
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _model(name: str, version: str | None = None) -> V2Model:
    if name not in MODELS:
        raise V2Error(404, f"Request for unknown model: {name!r}; models: {sorted(MODELS)}")
    if version not in (None, "", "1"):
        raise V2Error(404, f"Request for unknown version {version!r} of model {name!r}; it has version 1")
    return MODELS[name]


async def _model_ready(model: V2Model, scorers: Scorers, request: Request, timeout_s: float) -> tuple[bool, str]:
    client = scorers.configured().get(model.scorer)
    if client is None:
        return False, f"the {model.scorer} scorer is not configured on this gateway"
    if model.needs_token2wav and token2wav_of(request.app.state) is None:
        return False, "token2wav backend not configured"
    states = await client.health(timeout_s)
    ready, reason = "SERVING" in states.values(), f"{model.scorer}: {states}"
    if model.needs_token2wav and scorers.token2wav is not None:  # the hook is the token2wav service
        vocoder = await scorers.token2wav.health(timeout_s)
        ready, reason = ready and "SERVING" in vocoder.values(), f"{reason}; token2wav: {vocoder}"
    return ready, reason


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "speechrl-gateway", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every configured scorer is SERVING",
            responses={503: {"description": "A scorer is down."}})
async def ready(scorers: ScorersDep, config: ConfigDep) -> JSONResponse:
    states = await scorers.health(config.health_timeout_s)
    up = all("SERVING" in s.values() for s in states.values())
    return JSONResponse({"ready": up}, status_code=200 if up else 503)


@router.get("/models/{name}", summary="Model metadata: inputs and outputs", responses={404: _ERROR})
@router.get("/models/{name}/versions/{version}", include_in_schema=False)
async def model_metadata(name: str, version: str | None = None) -> JSONResponse:
    try:
        return JSONResponse(_model(name, version).metadata())
    except V2Error as exc:
        return v2_error(exc)


@router.get("/models/{name}/ready", summary="Model readiness: its scorer serves (and token2wav, where needed)",
            responses={404: _ERROR, 503: {"description": "Not ready; `reason` says why."}})
@router.get("/models/{name}/versions/{version}/ready", include_in_schema=False)
async def model_ready(name: str, request: Request, scorers: ScorersDep, config: ConfigDep,
                      version: str | None = None) -> JSONResponse:
    try:
        model = _model(name, version)
    except V2Error as exc:
        return v2_error(exc)
    ok, reason = await _model_ready(model, scorers, request, config.health_timeout_s)
    return JSONResponse({"name": name, "ready": ok, "reason": reason}, status_code=200 if ok else 503)


@router.post("/models/{name}/infer", summary="Score a batch (v2 inference protocol)", openapi_extra=_INFER_BODY,
             responses={400: _ERROR, 404: _ERROR, 429: _ERROR, 503: _ERROR, 504: _ERROR})
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False, openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request, scorers: ScorersDep, config: ConfigDep,
                version: str | None = None) -> Response:
    """One value per item in every output ([batch, 1]); REWARDS first. Items that could not be scored
    have SCORED false, a reason in ERRORS and `adapter_failure_reward` in REWARDS."""
    try:
        model = _model(name, version)
        if model.scorer not in scorers.configured():
            raise ScorerOff(model.scorer)
        with limiter_of(request).slot():
            header = request.headers.get("inference-header-content-length")
            try:
                header_length = int(header) if header is not None else None
            except ValueError:
                raise V2Error(400, f"Inference-Header-Content-Length is not a number: {header!r}") from None
            parsed, tensors = parse_infer_request(await request.body(), header_length)
            call = Call(tensors, parsed.parameters or {}, check_inputs(model, tensors), request.app.state, scorers, config)
            arrays = model.output_arrays(await model.run(call), config.adapter_failure_reward)
        wanted = [o.name for o in parsed.outputs] if parsed.outputs else [s.name for s in model.outputs]
        unknown = sorted(set(wanted) - set(arrays))
        if unknown:
            raise V2Error(400, f"unknown output(s) {unknown} for model {name}; it has {[s.name for s in model.outputs]}")
        types = {s.name: s.datatype for s in model.outputs}
        replies: list[dict[str, Any]] = []
        raw: list[bytes] = []  # the binary outputs' bytes, in the order of their headers
        for n in wanted:
            if wants_binary(parsed, n):
                raw.append(tensor_bytes(types[n], arrays[n]))
                replies.append({"name": n, "datatype": types[n], "shape": list(arrays[n].shape),
                                "parameters": {"binary_data_size": len(raw[-1])}})
            else:
                replies.append(output_tensor(n, types[n], arrays[n]))
        reply: dict[str, Any] = {"model_name": name, "model_version": "1", "outputs": replies}
        if parsed.id is not None:
            reply["id"] = parsed.id
        if not raw:
            return JSONResponse(reply)
        body, header_length = binary_reply(reply, raw)
        return Response(body, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})
    except (V2Error, TooBusy, ScorerOff, Token2WavNotConfigured, ServiceError) as exc:
        return v2_error(exc)
