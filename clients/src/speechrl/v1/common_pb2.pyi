from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PcmEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PCM_ENCODING_UNSPECIFIED: _ClassVar[PcmEncoding]
    PCM_S16LE: _ClassVar[PcmEncoding]
    PCM_F32LE: _ClassVar[PcmEncoding]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class ItemErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_ERROR_CODE_UNSPECIFIED: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INVALID_AUDIO: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_EMPTY_AUDIO: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_NON_FINITE_AUDIO: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_AUDIO_TOO_LONG: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_EMPTY_TEXT: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_UNKNOWN_SPEAKER: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INVALID_TENSOR: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_TEXT_TOO_LONG: _ClassVar[ItemErrorCode]
    ITEM_ERROR_CODE_INTERNAL: _ClassVar[ItemErrorCode]
PCM_ENCODING_UNSPECIFIED: PcmEncoding
PCM_S16LE: PcmEncoding
PCM_F32LE: PcmEncoding
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_FLOAT64: DType
ITEM_ERROR_CODE_UNSPECIFIED: ItemErrorCode
ITEM_ERROR_CODE_INVALID_AUDIO: ItemErrorCode
ITEM_ERROR_CODE_EMPTY_AUDIO: ItemErrorCode
ITEM_ERROR_CODE_NON_FINITE_AUDIO: ItemErrorCode
ITEM_ERROR_CODE_AUDIO_TOO_LONG: ItemErrorCode
ITEM_ERROR_CODE_EMPTY_TEXT: ItemErrorCode
ITEM_ERROR_CODE_UNKNOWN_SPEAKER: ItemErrorCode
ITEM_ERROR_CODE_INVALID_TENSOR: ItemErrorCode
ITEM_ERROR_CODE_TEXT_TOO_LONG: ItemErrorCode
ITEM_ERROR_CODE_INTERNAL: ItemErrorCode

class Audio(_message.Message):
    __slots__ = ("encoded", "pcm")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    PCM_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    pcm: RawPcm
    def __init__(self, encoded: _Optional[bytes] = ..., pcm: _Optional[_Union[RawPcm, _Mapping]] = ...) -> None: ...

class RawPcm(_message.Message):
    __slots__ = ("data", "sample_rate_hertz", "encoding", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HERTZ_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sample_rate_hertz: int
    encoding: PcmEncoding
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., sample_rate_hertz: _Optional[int] = ..., encoding: _Optional[_Union[PcmEncoding, str]] = ..., channels: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: ItemErrorCode
    message: str
    field: str
    def __init__(self, code: _Optional[_Union[ItemErrorCode, str]] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class ErrorCounts(_message.Message):
    __slots__ = ("hits", "substitutions", "insertions", "deletions")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SUBSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    INSERTIONS_FIELD_NUMBER: _ClassVar[int]
    DELETIONS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    substitutions: int
    insertions: int
    deletions: int
    def __init__(self, hits: _Optional[int] = ..., substitutions: _Optional[int] = ..., insertions: _Optional[int] = ..., deletions: _Optional[int] = ...) -> None: ...

class GetServiceStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServiceStatusResponse(_message.Message):
    __slots__ = ("service", "backend", "model", "device", "residency", "lease", "batching", "items_processed", "items_failed", "version", "policy_version", "device_memory")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FAILED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    service: str
    backend: str
    model: str
    device: str
    residency: str
    lease: LeaseState
    batching: BatchingConfig
    items_processed: int
    items_failed: int
    version: str
    policy_version: int
    device_memory: _containers.RepeatedCompositeFieldContainer[DeviceMemory]
    def __init__(self, service: _Optional[str] = ..., backend: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., residency: _Optional[str] = ..., lease: _Optional[_Union[LeaseState, _Mapping]] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., items_processed: _Optional[int] = ..., items_failed: _Optional[int] = ..., version: _Optional[str] = ..., policy_version: _Optional[int] = ..., device_memory: _Optional[_Iterable[_Union[DeviceMemory, _Mapping]]] = ...) -> None: ...

class DeviceMemory(_message.Message):
    __slots__ = ("device", "residency", "weight_bytes", "allocated_bytes", "reserved_bytes", "updated_unix_ms")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    device: str
    residency: str
    weight_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    updated_unix_ms: int
    def __init__(self, device: _Optional[str] = ..., residency: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class LeaseState(_message.Message):
    __slots__ = ("device", "held", "fencing_token")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device: str
    held: bool
    fencing_token: int
    def __init__(self, device: _Optional[str] = ..., held: _Optional[bool] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_wait_ms")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_wait_ms: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_wait_ms: _Optional[int] = ...) -> None: ...
