"""RolloutGenerator servicer: translates proto messages to GenerateItems and samples back."""

from __future__ import annotations

from concurrent.futures import Executor

import grpc
import numpy as np

from speechrl.client.codec import TensorError, numpy_to_tensor, tensor_to_numpy
from speechrl.services.batching import DynamicBatcher
from speechrl.services.errors import ErrorCode, ItemFailure, RequestInvalid
from speechrl.services.residency import DeviceGuard
from speechrl.services.rollout.backends import Sampling
from speechrl.services.rollout.engine import GenerateItem, PromptInput, RolloutEngine, SampleResult
from speechrl.services.servicing import check_count, grpc_method, item_error
from speechrl.v1 import rollout_pb2, rollout_pb2_grpc

FINISH_REASONS = {"stop": rollout_pb2.FINISH_REASON_STOP, "length": rollout_pb2.FINISH_REASON_LENGTH}
WEIGHT_FORMATS = {rollout_pb2.WEIGHTS_FORMAT_FULL: "full", rollout_pb2.WEIGHTS_FORMAT_LORA: "lora"}


def sampling_from_proto(params: rollout_pb2.SamplingParams) -> Sampling:
    """The engine's Sampling; the proto's zero values mean the documented defaults."""
    return Sampling(n=params.n or 1, temperature=params.temperature, top_p=params.top_p or 1.0,
                    top_k=params.top_k, max_tokens=params.max_tokens, stop=tuple(params.stop),
                    seed=params.seed if params.HasField("seed") else None)


def speech_range_from_proto(request: rollout_pb2.GenerateRequest) -> range | None:
    """The speech-token range of a SPEECH_TOKENS request, None in TEXT mode."""
    if request.mode in (rollout_pb2.GENERATION_MODE_UNSPECIFIED, rollout_pb2.GENERATION_MODE_TEXT):
        return None
    if request.mode != rollout_pb2.GENERATION_MODE_SPEECH_TOKENS:
        raise RequestInvalid("mode", f"unknown GenerationMode {request.mode}")
    if not request.HasField("speech_token_range"):
        raise RequestInvalid("speech_token_range", "is required when mode is GENERATION_MODE_SPEECH_TOKENS")
    return range(request.speech_token_range.begin, request.speech_token_range.end)


def prompt_from_proto(prompt: rollout_pb2.Prompt) -> PromptInput | ItemFailure:
    """The engine's PromptInput, or an ItemFailure when the embeddings tensor cannot be read."""
    kind = prompt.WhichOneof("content")
    if kind == "text":
        return PromptInput(text=prompt.text)
    if kind == "token_ids":
        return PromptInput(token_ids=tuple(prompt.token_ids.ids))
    if kind == "embeddings":
        try:
            embeddings = tensor_to_numpy(prompt.embeddings)
        except TensorError as exc:
            return ItemFailure(ErrorCode.INVALID_TENSOR, str(exc), "embeddings")
        if not np.issubdtype(embeddings.dtype, np.floating):
            return ItemFailure(ErrorCode.INVALID_TENSOR, f"embeddings must be float, got {embeddings.dtype}",
                               "embeddings")
        return PromptInput(embeddings=embeddings.astype(np.float32, copy=False),
                           suffix_token_ids=tuple(prompt.suffix_token_ids.ids),
                           prefix_token_ids=tuple(prompt.prefix_token_ids.ids))
    return PromptInput()  # the engine answers EMPTY_TEXT


def _sample_proto(index: int, sample: SampleResult) -> rollout_pb2.Sample:
    return rollout_pb2.Sample(prompt_index=index, token_ids=sample.token_ids, text=sample.text,
                              logprobs=numpy_to_tensor(np.asarray(sample.logprobs, dtype=np.float32)),
                              finish_reason=FINISH_REASONS[sample.finish_reason], policy_version=sample.policy_version)


class RolloutServicer(rollout_pb2_grpc.RolloutGeneratorServicer):
    """gRPC face of the rollout engine.

    Generate goes through the DynamicBatcher (prompts of concurrent requests share model steps);
    UpdateWeights runs under the same DeviceGuard (GPU lease, weights on the device) on the batcher's
    model thread, submitted to it directly (it waits for the batch in progress, not for queued items).
    """

    def __init__(self, engine: RolloutEngine, batcher: DynamicBatcher[GenerateItem, list[SampleResult]],
                 guard: DeviceGuard, model_thread: Executor, max_request_items: int):
        self.engine = engine
        self.batcher = batcher
        self.guard = guard
        self.model_thread = model_thread  # the batcher's: one OpenMP team (batching.model_thread)
        self.max_request_items = max_request_items

    @grpc_method
    async def Generate(self, request: rollout_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> rollout_pb2.GenerateResponse:
        check_count(request.prompts, "prompts", self.max_request_items)
        if not request.HasField("sampling"):
            raise RequestInvalid("sampling", "is required (at least sampling.max_tokens)")
        sampling = sampling_from_proto(request.sampling)
        speech_range = speech_range_from_proto(request)
        self.engine.check_request(sampling, speech_range)
        prompts = [prompt_from_proto(p) for p in request.prompts]
        items = [GenerateItem(p, sampling, speech_range) for p in prompts if isinstance(p, PromptInput)]
        results = iter(await self.batcher.submit(items))
        response = rollout_pb2.GenerateResponse()
        for index, prompt in enumerate(prompts):
            result = prompt if isinstance(prompt, ItemFailure) else next(results)
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result.at(f"prompts[{index}]")))
            else:
                response.results.add(samples=[_sample_proto(index, s) for s in result])
        return response

    @grpc_method
    async def UpdateWeights(self, request: rollout_pb2.UpdateWeightsRequest,
                            context: grpc.aio.ServicerContext) -> rollout_pb2.UpdateWeightsResponse:
        weights_format = WEIGHT_FORMATS.get(request.format)
        if weights_format is None:
            raise RequestInvalid("format", "must be WEIGHTS_FORMAT_FULL or WEIGHTS_FORMAT_LORA")

        def load(_: list[None]) -> list[int]:
            return [self.engine.update_weights(request.version, request.path, weights_format, request.fencing_token)]

        [version] = await self.guard.run(self.model_thread, load, [None])
        return rollout_pb2.UpdateWeightsResponse(version=version)
