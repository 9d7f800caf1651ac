from speechrl.v1 import common_pb2 as _common_pb2
from speechrl.v1 import intelligibility_pb2 as _intelligibility_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RuleRewardItem(_message.Message):
    __slots__ = ("hypothesis", "reference", "keywords", "language")
    HYPOTHESIS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    LANGUAGE_FIELD_NUMBER: _ClassVar[int]
    hypothesis: str
    reference: str
    keywords: _containers.RepeatedScalarFieldContainer[str]
    language: str
    def __init__(self, hypothesis: _Optional[str] = ..., reference: _Optional[str] = ..., keywords: _Optional[_Iterable[str]] = ..., language: _Optional[str] = ...) -> None: ...

class RuleRewardWeights(_message.Message):
    __slots__ = ("accuracy", "hallucination", "keyword")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HALLUCINATION_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    hallucination: float
    keyword: float
    def __init__(self, accuracy: _Optional[float] = ..., hallucination: _Optional[float] = ..., keyword: _Optional[float] = ...) -> None: ...

class ScoreRulesRequest(_message.Message):
    __slots__ = ("items", "weights", "accuracy_mapping", "accuracy_floor")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_MAPPING_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RuleRewardItem]
    weights: RuleRewardWeights
    accuracy_mapping: _intelligibility_pb2.WerRewardMapping
    accuracy_floor: float
    def __init__(self, items: _Optional[_Iterable[_Union[RuleRewardItem, _Mapping]]] = ..., weights: _Optional[_Union[RuleRewardWeights, _Mapping]] = ..., accuracy_mapping: _Optional[_Union[_intelligibility_pb2.WerRewardMapping, str]] = ..., accuracy_floor: _Optional[float] = ...) -> None: ...

class RuleRewardResult(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: RuleRewardScore
    error: _common_pb2.ItemError
    def __init__(self, score: _Optional[_Union[RuleRewardScore, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class RuleRewardScore(_message.Message):
    __slots__ = ("wer", "word_counts", "accuracy_reward", "hallucination_reward", "hallucination_reasons", "keyword_precision", "keyword_recall", "keyword_reward", "total")
    WER_FIELD_NUMBER: _ClassVar[int]
    WORD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_REWARD_FIELD_NUMBER: _ClassVar[int]
    HALLUCINATION_REWARD_FIELD_NUMBER: _ClassVar[int]
    HALLUCINATION_REASONS_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_PRECISION_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_RECALL_FIELD_NUMBER: _ClassVar[int]
    KEYWORD_REWARD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    wer: float
    word_counts: _common_pb2.ErrorCounts
    accuracy_reward: float
    hallucination_reward: float
    hallucination_reasons: _containers.RepeatedScalarFieldContainer[str]
    keyword_precision: float
    keyword_recall: float
    keyword_reward: float
    total: float
    def __init__(self, wer: _Optional[float] = ..., word_counts: _Optional[_Union[_common_pb2.ErrorCounts, _Mapping]] = ..., accuracy_reward: _Optional[float] = ..., hallucination_reward: _Optional[float] = ..., hallucination_reasons: _Optional[_Iterable[str]] = ..., keyword_precision: _Optional[float] = ..., keyword_recall: _Optional[float] = ..., keyword_reward: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class ScoreRulesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RuleRewardResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RuleRewardResult, _Mapping]]] = ...) -> None: ...
