"""AudioEncoder servicer: translates EncodeAudio requests to EncodeItems and streams one reply per item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from speechrl.client.codec import numpy_to_tensor
from speechrl.services.batching import DynamicBatcher
from speechrl.services.encoder.engine import EncodedAudio, EncodeItem
from speechrl.services.errors import ItemFailure, RequestInvalid
from speechrl.services.servicing import audio_from_proto, check_count, grpc_method, item_error
from speechrl.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

# Output dtypes the API offers -> the engine's names; UNSPECIFIED means float32.
OUTPUT_DTYPES = {
    common_pb2.DTYPE_UNSPECIFIED: "float32",
    common_pb2.DTYPE_FLOAT32: "float32",
    common_pb2.DTYPE_FLOAT16: "float16",
    common_pb2.DTYPE_BFLOAT16: "bfloat16",
}
DTYPE_ENUMS = {"float32": common_pb2.DTYPE_FLOAT32, "float16": common_pb2.DTYPE_FLOAT16,
               "bfloat16": common_pb2.DTYPE_BFLOAT16}


def _response(index: int, result: EncodedAudio | ItemFailure) -> encoder_pb2.EncodeAudioResponse:
    if isinstance(result, ItemFailure):
        return encoder_pb2.EncodeAudioResponse(index=index, error=item_error(result.at(f"audios[{index}]")))
    tensor = numpy_to_tensor(result.embeddings, DTYPE_ENUMS[result.output_dtype])
    return encoder_pb2.EncodeAudioResponse(index=index, embeddings=tensor, length=result.length)


def _release(futures: list[asyncio.Future]) -> None:
    """Cancel items nobody waits for any more; mark failures of finished ones as seen (no log noise)."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


class AudioEncoderServicer(encoder_pb2_grpc.AudioEncoderServicer):
    """gRPC face of the encoder engine: replies stream in request order, each as soon as its batch is done."""

    def __init__(self, batcher: DynamicBatcher[EncodeItem, EncodedAudio], max_request_items: int):
        self.batcher = batcher
        self.max_request_items = max_request_items

    @grpc_method
    async def EncodeAudio(self, request: encoder_pb2.EncodeAudioRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[encoder_pb2.EncodeAudioResponse]:
        check_count(request.audios, "audios", self.max_request_items)
        output_dtype = OUTPUT_DTYPES.get(request.output_dtype)
        if output_dtype is None:
            value = request.output_dtype
            name = common_pb2.DType.Name(value) if value in common_pb2.DType.values() else str(value)
            raise RequestInvalid("output_dtype", f"must be DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16, got {name}")
        futures = self.batcher.enqueue([EncodeItem(audio_from_proto(a), output_dtype) for a in request.audios])
        try:
            for index, future in enumerate(futures):
                # Each reply leaves as soon as its item is done, so the server holds at most the
                # unsent items' embeddings, never a whole response of every item.
                yield _response(index, await future)
        finally:
            _release(futures)
