"""SpeakerSimilarityScorer servicer: translates proto messages to engine items and results back."""

from __future__ import annotations

import grpc
import numpy as np

from speechrl.client.codec import TensorError, numpy_to_tensor, tensor_to_numpy
from speechrl.services.audio import AudioInput
from speechrl.services.batching import DynamicBatcher
from speechrl.services.errors import ErrorCode, ItemFailure, RequestInvalid
from speechrl.services.servicing import audio_from_proto, check_count, grpc_method, item_error
from speechrl.services.speaker.engine import (
    EmbeddingRef,
    EmbedItem,
    ScoreItem,
    SimilarityScore,
    SpeakerEngine,
    SpeakerOutcome,
    SpeakerRef,
    SpeakerWork,
)
from speechrl.v1 import speaker_pb2, speaker_pb2_grpc

# Proto enum <-> the mapping names of speechrl.rewards.similarity_reward.
MAPPING_NAMES: dict[speaker_pb2.SimilarityRewardMapping, str] = {
    speaker_pb2.SIMILARITY_REWARD_MAPPING_COSINE: "cosine",
    speaker_pb2.SIMILARITY_REWARD_MAPPING_SHIFTED: "shifted",
    speaker_pb2.SIMILARITY_REWARD_MAPPING_CLIPPED: "clipped",
}
MAPPING_ENUMS = {name: enum for enum, name in MAPPING_NAMES.items()}
MAX_SPEAKER_ID_CHARS = 256


def _mapping_name(value: speaker_pb2.SimilarityRewardMapping) -> str | None:
    if value == speaker_pb2.SIMILARITY_REWARD_MAPPING_UNSPECIFIED:
        return None
    name = MAPPING_NAMES.get(value)
    if name is None:
        raise RequestInvalid("reward_mapping", f"unknown value {int(value)}; use COSINE, SHIFTED or CLIPPED")
    return name


def _score_item(item: speaker_pb2.SpeakerSimilarityItem, index: int, mapping: str | None,
                shared: list[AudioInput]) -> ScoreItem | ItemFailure:
    """The engine item of one request item; a Tensor that does not decode fails that item only.

    An item with reference_index gets the very AudioInput of shared[reference_index], which its
    group's other items get too, so the engine finds the audio of the whole group in one dict entry.
    A bad shared audio fails each item using it at items[i].reference_audio, as an inline one does:
    the SDK and the gateway share references without their callers knowing.
    """
    kind = item.WhichOneof("reference")
    reference: AudioInput | EmbeddingRef | SpeakerRef
    if kind == "reference_audio":
        reference = audio_from_proto(item.reference_audio)
    elif kind == "reference_index":
        if item.reference_index >= len(shared):
            raise RequestInvalid(f"items[{index}].reference_index", f"{item.reference_index} is out of range "
                                 f"(the request has {len(shared)} reference_audios)")
        reference = shared[item.reference_index]
    elif kind == "speaker_id":
        reference = SpeakerRef(item.speaker_id)
    elif kind == "reference_embedding":
        try:
            reference = EmbeddingRef(tensor_to_numpy(item.reference_embedding))
        except TensorError as exc:
            return ItemFailure(ErrorCode.INVALID_TENSOR, str(exc), "reference_embedding")
    else:
        raise RequestInvalid(f"items[{index}].reference",
                             "set one of reference_audio, reference_index, reference_embedding, speaker_id")
    return ScoreItem(audio_from_proto(item.audio), reference, mapping)


class SpeakerSimilarityServicer(speaker_pb2_grpc.SpeakerSimilarityScorerServicer):
    """gRPC face of the speaker engine; all three RPCs share one batcher (one model thread)."""

    def __init__(self, engine: SpeakerEngine, batcher: DynamicBatcher[SpeakerWork, SpeakerOutcome],
                 max_request_items: int):
        self.engine = engine
        self.batcher = batcher
        self.max_request_items = max_request_items

    @grpc_method
    async def ScoreSpeakerSimilarity(self, request: speaker_pb2.ScoreSpeakerSimilarityRequest,
                                     context: grpc.aio.ServicerContext) -> speaker_pb2.ScoreSpeakerSimilarityResponse:
        check_count(request.items, "items", self.max_request_items)
        mapping = _mapping_name(request.reward_mapping)
        shared = [audio_from_proto(a) for a in request.reference_audios]  # one object per shared audio
        items = [_score_item(item, i, mapping, shared) for i, item in enumerate(request.items)]
        work: list[SpeakerWork] = [item for item in items if isinstance(item, ScoreItem)]
        done = iter(await self.batcher.submit(work))
        response = speaker_pb2.ScoreSpeakerSimilarityResponse()
        for index, item in enumerate(items):
            result = item if isinstance(item, ItemFailure) else next(done)
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result.at(f"items[{index}]")))
            elif isinstance(result, SimilarityScore):
                response.results.add(score=speaker_pb2.SpeakerSimilarityScore(
                    cosine=result.cosine, reward=result.reward, reward_mapping=MAPPING_ENUMS[result.mapping]))
            else:
                raise TypeError(f"engine answered a ScoreItem with {type(result).__name__}")
        return response

    @grpc_method
    async def EmbedSpeaker(self, request: speaker_pb2.EmbedSpeakerRequest,
                           context: grpc.aio.ServicerContext) -> speaker_pb2.EmbedSpeakerResponse:
        check_count(request.audios, "audios", self.max_request_items)
        results = await self.batcher.submit([EmbedItem(audio_from_proto(a)) for a in request.audios])
        response = speaker_pb2.EmbedSpeakerResponse()
        for index, result in enumerate(results):
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result.at(f"audios[{index}]")))
            else:
                response.results.add(embedding=numpy_to_tensor(_vector(result)))
        return response

    @grpc_method
    async def RegisterSpeaker(self, request: speaker_pb2.RegisterSpeakerRequest,
                              context: grpc.aio.ServicerContext) -> speaker_pb2.RegisterSpeakerResponse:
        if not request.speaker_id.strip():
            raise RequestInvalid("speaker_id", "must not be empty")
        if len(request.speaker_id) > MAX_SPEAKER_ID_CHARS:
            raise RequestInvalid("speaker_id", f"has {len(request.speaker_id)} characters, over {MAX_SPEAKER_ID_CHARS}")
        check_count(request.audios, "audios", self.max_request_items)
        results = await self.batcher.submit([EmbedItem(audio_from_proto(a)) for a in request.audios])
        embeddings: list[np.ndarray] = []
        for index, result in enumerate(results):
            if isinstance(result, ItemFailure):
                # One speaker, one answer: a bad audio makes the whole registration invalid.
                if result.code == ErrorCode.INTERNAL:
                    raise RuntimeError(f"audios[{index}]: {result.message}")
                raise RequestInvalid(f"audios[{index}]", f"{result.code.value}: {result.message}")
            embeddings.append(_vector(result))
        stored = self.engine.register(request.speaker_id, embeddings)
        return speaker_pb2.RegisterSpeakerResponse(speaker_id=request.speaker_id, embedding=numpy_to_tensor(stored))


def _vector(result: SpeakerOutcome) -> np.ndarray:
    if not isinstance(result, np.ndarray):
        raise TypeError(f"engine answered an EmbedItem with {type(result).__name__}")
    return result

