from speechrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SynthesizeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[SynthesisItem]
    def __init__(self, items: _Optional[_Iterable[_Union[SynthesisItem, _Mapping]]] = ...) -> None: ...

class SynthesisItem(_message.Message):
    __slots__ = ("tokens", "voice", "prompt_audio", "rate_wpm")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VOICE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_AUDIO_FIELD_NUMBER: _ClassVar[int]
    RATE_WPM_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    voice: str
    prompt_audio: _common_pb2.Audio
    rate_wpm: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., voice: _Optional[str] = ..., prompt_audio: _Optional[_Union[_common_pb2.Audio, _Mapping]] = ..., rate_wpm: _Optional[int] = ...) -> None: ...

class SynthesizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SynthesisResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SynthesisResult, _Mapping]]] = ...) -> None: ...

class SynthesisResult(_message.Message):
    __slots__ = ("audio", "error")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    audio: SynthesizedAudio
    error: _common_pb2.ItemError
    def __init__(self, audio: _Optional[_Union[SynthesizedAudio, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class SynthesizedAudio(_message.Message):
    __slots__ = ("wav", "sample_rate_hertz", "duration_seconds")
    WAV_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wav: bytes
    sample_rate_hertz: int
    duration_seconds: float
    def __init__(self, wav: _Optional[bytes] = ..., sample_rate_hertz: _Optional[int] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class ScoreTokensRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TokenTextItem]
    def __init__(self, items: _Optional[_Iterable[_Union[TokenTextItem, _Mapping]]] = ...) -> None: ...

class TokenTextItem(_message.Message):
    __slots__ = ("tokens", "text")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class ScoreTokensResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenScoreResult, _Mapping]]] = ...) -> None: ...

class TokenScoreResult(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: TokenScore
    error: _common_pb2.ItemError
    def __init__(self, score: _Optional[_Union[TokenScore, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("log_prob", "num_chars", "alignable", "reward")
    LOG_PROB_FIELD_NUMBER: _ClassVar[int]
    NUM_CHARS_FIELD_NUMBER: _ClassVar[int]
    ALIGNABLE_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    log_prob: float
    num_chars: int
    alignable: bool
    reward: float
    def __init__(self, log_prob: _Optional[float] = ..., num_chars: _Optional[int] = ..., alignable: _Optional[bool] = ..., reward: _Optional[float] = ...) -> None: ...
