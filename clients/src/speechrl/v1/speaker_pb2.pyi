from speechrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SimilarityRewardMapping(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIMILARITY_REWARD_MAPPING_UNSPECIFIED: _ClassVar[SimilarityRewardMapping]
    SIMILARITY_REWARD_MAPPING_COSINE: _ClassVar[SimilarityRewardMapping]
    SIMILARITY_REWARD_MAPPING_SHIFTED: _ClassVar[SimilarityRewardMapping]
    SIMILARITY_REWARD_MAPPING_CLIPPED: _ClassVar[SimilarityRewardMapping]
SIMILARITY_REWARD_MAPPING_UNSPECIFIED: SimilarityRewardMapping
SIMILARITY_REWARD_MAPPING_COSINE: SimilarityRewardMapping
SIMILARITY_REWARD_MAPPING_SHIFTED: SimilarityRewardMapping
SIMILARITY_REWARD_MAPPING_CLIPPED: SimilarityRewardMapping

class SpeakerSimilarityItem(_message.Message):
    __slots__ = ("audio", "reference_audio", "reference_embedding", "speaker_id", "reference_index")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    audio: _common_pb2.Audio
    reference_audio: _common_pb2.Audio
    reference_embedding: _common_pb2.Tensor
    speaker_id: str
    reference_index: int
    def __init__(self, audio: _Optional[_Union[_common_pb2.Audio, _Mapping]] = ..., reference_audio: _Optional[_Union[_common_pb2.Audio, _Mapping]] = ..., reference_embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., speaker_id: _Optional[str] = ..., reference_index: _Optional[int] = ...) -> None: ...

class ScoreSpeakerSimilarityRequest(_message.Message):
    __slots__ = ("items", "reward_mapping", "reference_audios")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REWARD_MAPPING_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_AUDIOS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SpeakerSimilarityItem]
    reward_mapping: SimilarityRewardMapping
    reference_audios: _containers.RepeatedCompositeFieldContainer[_common_pb2.Audio]
    def __init__(self, items: _Optional[_Iterable[_Union[SpeakerSimilarityItem, _Mapping]]] = ..., reward_mapping: _Optional[_Union[SimilarityRewardMapping, str]] = ..., reference_audios: _Optional[_Iterable[_Union[_common_pb2.Audio, _Mapping]]] = ...) -> None: ...

class SpeakerSimilarityResult(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: SpeakerSimilarityScore
    error: _common_pb2.ItemError
    def __init__(self, score: _Optional[_Union[SpeakerSimilarityScore, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class SpeakerSimilarityScore(_message.Message):
    __slots__ = ("cosine", "reward", "reward_mapping")
    COSINE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    REWARD_MAPPING_FIELD_NUMBER: _ClassVar[int]
    cosine: float
    reward: float
    reward_mapping: SimilarityRewardMapping
    def __init__(self, cosine: _Optional[float] = ..., reward: _Optional[float] = ..., reward_mapping: _Optional[_Union[SimilarityRewardMapping, str]] = ...) -> None: ...

class ScoreSpeakerSimilarityResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SpeakerSimilarityResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SpeakerSimilarityResult, _Mapping]]] = ...) -> None: ...

class EmbedSpeakerRequest(_message.Message):
    __slots__ = ("audios",)
    AUDIOS_FIELD_NUMBER: _ClassVar[int]
    audios: _containers.RepeatedCompositeFieldContainer[_common_pb2.Audio]
    def __init__(self, audios: _Optional[_Iterable[_Union[_common_pb2.Audio, _Mapping]]] = ...) -> None: ...

class EmbedSpeakerResult(_message.Message):
    __slots__ = ("embedding", "error")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    embedding: _common_pb2.Tensor
    error: _common_pb2.ItemError
    def __init__(self, embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class EmbedSpeakerResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EmbedSpeakerResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EmbedSpeakerResult, _Mapping]]] = ...) -> None: ...

class RegisterSpeakerRequest(_message.Message):
    __slots__ = ("speaker_id", "audios")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIOS_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    audios: _containers.RepeatedCompositeFieldContainer[_common_pb2.Audio]
    def __init__(self, speaker_id: _Optional[str] = ..., audios: _Optional[_Iterable[_Union[_common_pb2.Audio, _Mapping]]] = ...) -> None: ...

class RegisterSpeakerResponse(_message.Message):
    __slots__ = ("speaker_id", "embedding")
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    speaker_id: str
    embedding: _common_pb2.Tensor
    def __init__(self, speaker_id: _Optional[str] = ..., embedding: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
