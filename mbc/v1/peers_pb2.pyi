from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedPhrasesRequest(_message.Message):
    __slots__ = ("model_id", "phrases")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    phrases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., phrases: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedPhrasesResponse(_message.Message):
    __slots__ = ("dimension", "vectors")
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    dimension: int
    vectors: bytes
    def __init__(self, dimension: _Optional[int] = ..., vectors: _Optional[bytes] = ...) -> None: ...

class GetHeadsRequest(_message.Message):
    __slots__ = ("key", "wait_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    key: str
    wait_ms: int
    def __init__(self, key: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: bytes
    def __init__(self, heads: _Optional[bytes] = ...) -> None: ...
