"""IntelligibilityScorer servicer: translates proto messages to IntelligibilityItems and results back."""

from __future__ import annotations

import grpc

from speechrl.rewards.wer import Counts
from speechrl.services.batching import DynamicBatcher
from speechrl.services.errors import ItemFailure, RequestInvalid
from speechrl.services.intelligibility.engine import IntelligibilityItem, IntelligibilityResult
from speechrl.services.servicing import (
    WER_MAPPING_VALUES,
    audio_from_proto,
    check_count,
    grpc_method,
    item_error,
    wer_mapping_name,
)
from speechrl.v1 import common_pb2, intelligibility_pb2, intelligibility_pb2_grpc

UNIT_NAMES = {
    intelligibility_pb2.ERROR_UNIT_WORD: "word",
    intelligibility_pb2.ERROR_UNIT_CHARACTER: "character",
    intelligibility_pb2.ERROR_UNIT_PINYIN: "pinyin",
}
UNIT_VALUES = {name: value for value, name in UNIT_NAMES.items()}


def _counts(counts: Counts) -> common_pb2.ErrorCounts:
    return common_pb2.ErrorCounts(hits=counts.hits, substitutions=counts.substitutions,
                                  insertions=counts.insertions, deletions=counts.deletions)


def _score_proto(result: IntelligibilityResult) -> intelligibility_pb2.IntelligibilityScore:
    rates = result.rates
    return intelligibility_pb2.IntelligibilityScore(
        transcript=result.transcript, normalized_transcript=rates.normalized_hypothesis,
        normalized_reference=rates.normalized_reference, wer=rates.wer, cer=rates.cer,
        word_counts=_counts(rates.word_counts), char_counts=_counts(rates.char_counts), reward=result.reward,
        reward_mapping=WER_MAPPING_VALUES[result.mapping], audio_duration_seconds=result.audio_seconds,
        error_rate=result.error_rate, error_unit=UNIT_VALUES[result.unit])


class IntelligibilityServicer(intelligibility_pb2_grpc.IntelligibilityScorerServicer):
    """gRPC face of the intelligibility engine.

    Languages the model cannot be told to transcribe are the caller's configuration error, so
    they fail the request (INVALID_ARGUMENT naming the item) rather than one item.
    """

    def __init__(self, batcher: DynamicBatcher[IntelligibilityItem, IntelligibilityResult], max_request_items: int,
                 languages: frozenset[str], default_language: str, default_mapping: str):
        self.batcher = batcher
        self.max_request_items = max_request_items
        self.languages = languages
        self.default_language = default_language
        self.default_mapping = default_mapping

    @grpc_method
    async def ScoreIntelligibility(self, request: intelligibility_pb2.ScoreIntelligibilityRequest,
                                   context: grpc.aio.ServicerContext) -> intelligibility_pb2.ScoreIntelligibilityResponse:
        check_count(request.items, "items", self.max_request_items)
        mapping = wer_mapping_name(request.reward_mapping, "reward_mapping", self.default_mapping)
        unit = self._unit(request.error_unit)
        items = []
        for index, item in enumerate(request.items):
            # "en-US" -> "en": Whisper's language tokens and the normalisers key on the base code.
            language = (item.language or self.default_language).lower().split("-")[0]
            if language not in self.languages:
                raise RequestInvalid(f"items[{index}].language",
                                     f"{item.language!r} is not a language this model transcribes; "
                                     f"it knows {sorted(self.languages)}")
            items.append(IntelligibilityItem(audio_from_proto(item.audio), item.reference_text, language, mapping, unit))
        results = await self.batcher.submit(items)
        response = intelligibility_pb2.ScoreIntelligibilityResponse()
        for index, result in enumerate(results):
            if isinstance(result, ItemFailure):
                response.results.add(error=item_error(result.at(f"items[{index}]")))
            else:
                response.results.add(score=_score_proto(result))
        return response

    @staticmethod
    def _unit(value: int) -> str:
        if value == intelligibility_pb2.ERROR_UNIT_UNSPECIFIED:
            return "word"
        if value not in UNIT_NAMES:
            raise RequestInvalid("error_unit", f"unknown ErrorUnit value {value}")
        return UNIT_NAMES[value]  # type: ignore[index]
