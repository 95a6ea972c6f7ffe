from google.protobuf import struct_pb2 as _struct_pb2
from mbc.v1 import bot_pb2 as _bot_pb2
from mbc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_GLOBAL: _ClassVar[Scope]
    SCOPE_CONSUMER: _ClassVar[Scope]
    SCOPE_CONVERSATION: _ClassVar[Scope]
SCOPE_UNSPECIFIED: Scope
SCOPE_GLOBAL: Scope
SCOPE_CONSUMER: Scope
SCOPE_CONVERSATION: Scope

class RegisterNamespaceRequest(_message.Message):
    __slots__ = ("namespace", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    ttl_seconds: int
    def __init__(self, namespace: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class RegisterNamespaceResponse(_message.Message):
    __slots__ = ("namespace", "ttl_seconds")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    ttl_seconds: int
    def __init__(self, namespace: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ContextKey(_message.Message):
    __slots__ = ("namespace", "scope", "scope_id", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    scope: Scope
    scope_id: str
    key: str
    def __init__(self, namespace: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., scope_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetContextRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ContextKey
    def __init__(self, key: _Optional[_Union[ContextKey, _Mapping]] = ...) -> None: ...

class GetContextResponse(_message.Message):
    __slots__ = ("found", "value", "version")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: _struct_pb2.Value
    version: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class SetContextRequest(_message.Message):
    __slots__ = ("key", "value", "expected_version", "owner_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: ContextKey
    value: _struct_pb2.Value
    expected_version: int
    owner_version: int
    def __init__(self, key: _Optional[_Union[ContextKey, _Mapping]] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., expected_version: _Optional[int] = ..., owner_version: _Optional[int] = ...) -> None: ...

class SetContextResponse(_message.Message):
    __slots__ = ("written", "version", "expires_at_unix_ms")
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    written: bool
    version: int
    expires_at_unix_ms: int
    def __init__(self, written: _Optional[bool] = ..., version: _Optional[int] = ..., expires_at_unix_ms: _Optional[int] = ...) -> None: ...

class DeleteContextRequest(_message.Message):
    __slots__ = ("key", "expected_version", "owner_version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    key: ContextKey
    expected_version: int
    owner_version: int
    def __init__(self, key: _Optional[_Union[ContextKey, _Mapping]] = ..., expected_version: _Optional[int] = ..., owner_version: _Optional[int] = ...) -> None: ...

class DeleteContextResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListContextRequest(_message.Message):
    __slots__ = ("namespace", "scope", "scope_id")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ID_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    scope: Scope
    scope_id: str
    def __init__(self, namespace: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., scope_id: _Optional[str] = ...) -> None: ...

class ContextEntry(_message.Message):
    __slots__ = ("key", "value", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: _struct_pb2.Value
    version: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ListContextResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ContextEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[ContextEntry, _Mapping]]] = ...) -> None: ...

class Ownership(_message.Message):
    __slots__ = ("owner", "transfer_id", "updated_at_unix_ms", "transfer_response")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    owner: _common_pb2.BotRef
    transfer_id: str
    updated_at_unix_ms: int
    transfer_response: _bot_pb2.TransferResponse
    def __init__(self, owner: _Optional[_Union[_common_pb2.BotRef, _Mapping]] = ..., transfer_id: _Optional[str] = ..., updated_at_unix_ms: _Optional[int] = ..., transfer_response: _Optional[_Union[_bot_pb2.TransferResponse, _Mapping]] = ...) -> None: ...

class GetOwnerRequest(_message.Message):
    __slots__ = ("conversation_id",)
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    def __init__(self, conversation_id: _Optional[str] = ...) -> None: ...

class GetOwnerResponse(_message.Message):
    __slots__ = ("found", "ownership", "version")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    ownership: Ownership
    version: int
    def __init__(self, found: _Optional[bool] = ..., ownership: _Optional[_Union[Ownership, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class ClaimOwnerRequest(_message.Message):
    __slots__ = ("conversation_id", "ownership", "expected_version")
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    ownership: Ownership
    expected_version: int
    def __init__(self, conversation_id: _Optional[str] = ..., ownership: _Optional[_Union[Ownership, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ClaimOwnerResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...
