from speechrl.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeAudioRequest(_message.Message):
    __slots__ = ("audios", "output_dtype")
    AUDIOS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    audios: _containers.RepeatedCompositeFieldContainer[_common_pb2.Audio]
    output_dtype: _common_pb2.DType
    def __init__(self, audios: _Optional[_Iterable[_Union[_common_pb2.Audio, _Mapping]]] = ..., output_dtype: _Optional[_Union[_common_pb2.DType, str]] = ...) -> None: ...

class EncodeAudioResponse(_message.Message):
    __slots__ = ("index", "embeddings", "error", "length")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    index: int
    embeddings: _common_pb2.Tensor
    error: _common_pb2.ItemError
    length: int
    def __init__(self, index: _Optional[int] = ..., embeddings: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., length: _Optional[int] = ...) -> None: ...
