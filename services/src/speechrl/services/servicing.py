"""The one place where proto messages become engine inputs and engine outcomes become replies.

Servicers use these helpers so that every service reports failures the same way: per-item
ItemError messages for item problems, and gRPC status codes (with a message naming the field)
for problems of the request as a whole.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Sized
from typing import Any, TypeVar

import grpc

from speechrl.services.audio import AudioInput
from speechrl.services.batching import REQUEST_DEADLINE, DeadlineExpired, QueueFull
from speechrl.services.errors import ItemFailure, RequestInvalid, StaleFence
from speechrl.services.lease import LeaseError
from speechrl.v1 import common_pb2, intelligibility_pb2

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])  # a coroutine function or an async generator function

# Proto WerRewardMapping value <-> speechrl.rewards.WER_MAPPINGS name: the intelligibility scorer's
# reward and the rule rewards' R1.
WER_MAPPING_NAMES = {
    intelligibility_pb2.WER_REWARD_MAPPING_ONE_MINUS_WER: "one_minus_wer",
    intelligibility_pb2.WER_REWARD_MAPPING_ONE_MINUS_TANH_3WER: "one_minus_tanh_3wer",
    intelligibility_pb2.WER_REWARD_MAPPING_NEGATIVE_WER: "negative_wer",
}
WER_MAPPING_VALUES = {name: value for value, name in WER_MAPPING_NAMES.items()}


def wer_mapping_name(value: int, field: str, default: str) -> str:
    """The WER_MAPPINGS name of a request's WerRewardMapping field; default where it is unset."""
    if value == intelligibility_pb2.WER_REWARD_MAPPING_UNSPECIFIED:
        return default
    if value not in WER_MAPPING_NAMES:
        raise RequestInvalid(field, f"unknown WerRewardMapping value {value}")
    return WER_MAPPING_NAMES[value]  # type: ignore[index]


def audio_from_proto(audio: common_pb2.Audio) -> AudioInput:
    """The engine-side view of an Audio message (decoding happens in the model thread)."""
    source = audio.WhichOneof("source")
    if source == "encoded":
        return AudioInput(encoded=audio.encoded)
    if source == "pcm":
        encoding = common_pb2.PcmEncoding.Name(audio.pcm.encoding) if audio.pcm.encoding in common_pb2.PcmEncoding.values() else ""
        return AudioInput(pcm=audio.pcm.data, sample_rate_hertz=audio.pcm.sample_rate_hertz,
                          pcm_encoding="" if encoding == "PCM_ENCODING_UNSPECIFIED" else encoding,
                          channels=audio.pcm.channels or 1)
    return AudioInput()


def item_error(failure: ItemFailure) -> common_pb2.ItemError:
    """The ItemError message of an engine's ItemFailure."""
    code = common_pb2.ItemErrorCode.Value(f"ITEM_ERROR_CODE_{failure.code.value}")
    return common_pb2.ItemError(code=code, message=failure.message, field=failure.field)  # type: ignore[arg-type]


def check_count(items: Sized, field: str, limit: int) -> None:
    """Reject an empty or oversized repeated field as a whole."""
    if len(items) == 0:
        raise RequestInvalid(field, "must have at least one item")
    if len(items) > limit:
        raise RequestInvalid(field, f"has {len(items)} items, over the server's limit of {limit} (max_request_items); split the request")


async def _abort_for(name: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """End the call with the status code of exc (always raises grpc's AbortError)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, RequestInvalid):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, QueueFull):
        # Keep what the interceptor set (x-request-id): set_trailing_metadata replaces.
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), ("retry-after-ms", "200")))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry after 200 ms")
    if isinstance(exc, DeadlineExpired):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, LeaseError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"GPU lease: {exc}")
    if isinstance(exc, StaleFence):
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), ("speechrl-error-code", "STALE_FENCE"),
                                       ("speechrl-fence", str(exc.fence)), ("speechrl-accepted-fence", str(exc.accepted))))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    log.error("%s failed", name, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _set_deadline(context: grpc.aio.ServicerContext) -> None:
    """Hand the call's deadline to the batcher (a context variable: each call runs in its own task)."""
    remaining = context.time_remaining()
    REQUEST_DEADLINE.set(None if remaining is None else time.monotonic() + remaining)


def grpc_method(method: F) -> F:
    """Map exceptions of a servicer method to status codes, in one place.

    RequestInvalid -> INVALID_ARGUMENT, QueueFull -> RESOURCE_EXHAUSTED (with a retry hint),
    DeadlineExpired (the caller gave up before its items ran) -> DEADLINE_EXCEEDED,
    LeaseError (Redis down, lease wait timed out) -> UNAVAILABLE with the reason, StaleFence -> FAILED_PRECONDITION
    (trailing speechrl-error-code STALE_FENCE, speechrl-fence, speechrl-accepted-fence), anything unexpected ->
    INTERNAL (logged with its traceback; the server stays up).
    Works for unary methods and for server-streaming ones (async generators); a stream that fails
    midway keeps the replies already sent and then ends with the status.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            _set_deadline(context)
            try:
                async for reply in method(self, request, context):
                    yield reply
            except Exception as exc:  # noqa: BLE001 - _abort_for maps every exception to a status
                await _abort_for(method.__name__, exc, context)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        _set_deadline(context)
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - _abort_for maps every exception to a status
            await _abort_for(method.__name__, exc, context)

    return wrapper  # type: ignore[return-value]
