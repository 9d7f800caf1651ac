"""gRPC face of the token2wav engines: proto <-> SynthesisItem / Waveform and TokenTextItem / TokenScore."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import grpc

from speechrl.services.batching import DynamicBatcher
from speechrl.services.errors import ItemFailure
from speechrl.services.servicing import check_count, grpc_method, item_error
from speechrl.services.token2wav.backends import SynthesisItem, Waveform
from speechrl.services.token2wav.engine import TokenScore, TokenTextItem
from speechrl.v1 import token2wav_pb2, token2wav_pb2_grpc

ResultT = TypeVar("ResultT")


class Token2WavServicer(token2wav_pb2_grpc.Token2WavServicer):
    """Translates Synthesize requests for the batcher (which takes the GPU lease per batch)."""

    def __init__(self, batcher: DynamicBatcher[SynthesisItem, Waveform], max_request_items: int,
                 scorer: DynamicBatcher[TokenTextItem, TokenScore] | None = None):
        self.batcher = batcher
        self.max_request_items = max_request_items
        self.scorer = scorer  # None: started without a Token2Reward checkpoint

    @grpc_method
    async def Synthesize(self, request: token2wav_pb2.SynthesizeRequest,
                         context: grpc.aio.ServicerContext) -> token2wav_pb2.SynthesizeResponse:
        check_count(request.items, "items", self.max_request_items)
        items = [SynthesisItem(tokens=list(i.tokens), voice=i.voice, rate_wpm=i.rate_wpm,
                               prompt_audio=i.prompt_audio.encoded if i.HasField("prompt_audio") else None)
                 for i in request.items]
        response = token2wav_pb2.SynthesizeResponse()
        for result in _located(await self.batcher.submit(items)):
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result))
            else:
                response.results.add(audio=token2wav_pb2.SynthesizedAudio(
                    wav=result.wav_bytes(), sample_rate_hertz=result.sample_rate_hertz,
                    duration_seconds=len(result.samples) / result.sample_rate_hertz))
        return response

    @grpc_method
    async def ScoreTokens(self, request: token2wav_pb2.ScoreTokensRequest,
                          context: grpc.aio.ServicerContext) -> token2wav_pb2.ScoreTokensResponse:
        if self.scorer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "ScoreTokens needs a Token2Reward: start the "
                                                                     "server with --token2reward DIR")
            raise AssertionError("unreachable: abort raises")
        check_count(request.items, "items", self.max_request_items)
        response = token2wav_pb2.ScoreTokensResponse()
        for result in _located(await self.scorer.submit([TokenTextItem(list(i.tokens), i.text) for i in request.items])):
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result))
            else:
                response.results.add(score=token2wav_pb2.TokenScore(
                    log_prob=result.log_prob, num_chars=result.num_chars, alignable=result.alignable,
                    reward=result.reward))
        return response


def _located(results: Sequence[ResultT | ItemFailure]) -> list[ResultT | ItemFailure]:
    """The results with each failure located at its request item (items[i])."""
    return [r.at(f"items[{i}]") if isinstance(r, ItemFailure) else r for i, r in enumerate(results)]
