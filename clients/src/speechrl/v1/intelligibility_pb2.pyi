from speechrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WerRewardMapping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WER_REWARD_MAPPING_UNSPECIFIED: _ClassVar[WerRewardMapping]
    WER_REWARD_MAPPING_ONE_MINUS_WER: _ClassVar[WerRewardMapping]
    WER_REWARD_MAPPING_ONE_MINUS_TANH_3WER: _ClassVar[WerRewardMapping]
    WER_REWARD_MAPPING_NEGATIVE_WER: _ClassVar[WerRewardMapping]

class ErrorUnit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNIT_UNSPECIFIED: _ClassVar[ErrorUnit]
    ERROR_UNIT_WORD: _ClassVar[ErrorUnit]
    ERROR_UNIT_CHARACTER: _ClassVar[ErrorUnit]
    ERROR_UNIT_PINYIN: _ClassVar[ErrorUnit]
WER_REWARD_MAPPING_UNSPECIFIED: WerRewardMapping
WER_REWARD_MAPPING_ONE_MINUS_WER: WerRewardMapping
WER_REWARD_MAPPING_ONE_MINUS_TANH_3WER: WerRewardMapping
WER_REWARD_MAPPING_NEGATIVE_WER: WerRewardMapping
ERROR_UNIT_UNSPECIFIED: ErrorUnit
ERROR_UNIT_WORD: ErrorUnit
ERROR_UNIT_CHARACTER: ErrorUnit
ERROR_UNIT_PINYIN: ErrorUnit

class IntelligibilityItem(_message.Message):
    __slots__ = ("audio", "reference_text", "language")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TEXT_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    audio: _common_pb2.Audio
    reference_text: str
    language: str
    def __init__(self, audio: _Optional[_Union[_common_pb2.Audio, _Mapping]] = ..., reference_text: _Optional[str] = ..., language: _Optional[str] = ...) -> None: ...

class ScoreIntelligibilityRequest(_message.Message):
    __slots__ = ("items", "reward_mapping", "error_unit")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MAPPING_FIELD_NUMBER: _ClassVar[int]
    ERROR_UNIT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[IntelligibilityItem]
    reward_mapping: WerRewardMapping
    error_unit: ErrorUnit
    def __init__(self, items: _Optional[_Iterable[_Union[IntelligibilityItem, _Mapping]]] = ..., reward_mapping: _Optional[_Union[WerRewardMapping, str]] = ..., error_unit: _Optional[_Union[ErrorUnit, str]] = ...) -> None: ...

class IntelligibilityResult(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: IntelligibilityScore
    error: _common_pb2.ItemError
    def __init__(self, score: _Optional[_Union[IntelligibilityScore, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class IntelligibilityScore(_message.Message):
    __slots__ = ("transcript", "normalized_transcript", "normalized_reference", "wer", "cer", "word_counts", "char_counts", "reward", "reward_mapping", "audio_duration_seconds", "error_rate", "error_unit")
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    WER_FIELD_NUMBER: _ClassVar[int]
    CER_FIELD_NUMBER: _ClassVar[int]
    WORD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    CHAR_COUNTS_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_MAPPING_FIELD_NUMBER: _ClassVar[int]
    AUDIO_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_UNIT_FIELD_NUMBER: _ClassVar[int]
    transcript: str
    normalized_transcript: str
    normalized_reference: str
    wer: float
    cer: float
    word_counts: _common_pb2.ErrorCounts
    char_counts: _common_pb2.ErrorCounts
    reward: float
    reward_mapping: WerRewardMapping
    audio_duration_seconds: float
    error_rate: float
    error_unit: ErrorUnit
    def __init__(self, transcript: _Optional[str] = ..., normalized_transcript: _Optional[str] = ..., normalized_reference: _Optional[str] = ..., wer: _Optional[float] = ..., cer: _Optional[float] = ..., word_counts: _Optional[_Union[_common_pb2.ErrorCounts, _Mapping]] = ..., char_counts: _Optional[_Union[_common_pb2.ErrorCounts, _Mapping]] = ..., reward: _Optional[float] = ..., reward_mapping: _Optional[_Union[WerRewardMapping, str]] = ..., audio_duration_seconds: _Optional[float] = ..., error_rate: _Optional[float] = ..., error_unit: _Optional[_Union[ErrorUnit, str]] = ...) -> None: ...

class ScoreIntelligibilityResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[IntelligibilityResult]
    def __init__(self, results: _Optional[_Iterable[_Union[IntelligibilityResult, _Mapping]]] = ...) -> None: ...
