from mbc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ANSWERED: _ClassVar[Outcome]
    OUTCOME_TRANSFERRED: _ClassVar[Outcome]
    OUTCOME_FALLBACK: _ClassVar[Outcome]
    OUTCOME_CLARIFY: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ANSWERED: Outcome
OUTCOME_TRANSFERRED: Outcome
OUTCOME_FALLBACK: Outcome
OUTCOME_CLARIFY: Outcome

class ClarifyOption(_message.Message):
    __slots__ = ("label", "bot_id", "intent")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    label: str
    bot_id: str
    intent: str
    def __init__(self, label: _Optional[str] = ..., bot_id: _Optional[str] = ..., intent: _Optional[str] = ...) -> None: ...

class RespondRequest(_message.Message):
    __slots__ = ("conversation_id", "consumer_id", "text", "channel_metadata", "bot_id")
    class ChannelMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_METADATA_FIELD_NUMBER: _ClassVar[int]
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    conversation_id: str
    consumer_id: str
    text: str
    channel_metadata: _containers.ScalarMap[str, str]
    bot_id: str
    def __init__(self, conversation_id: _Optional[str] = ..., consumer_id: _Optional[str] = ..., text: _Optional[str] = ..., channel_metadata: _Optional[_Mapping[str, str]] = ..., bot_id: _Optional[str] = ...) -> None: ...

class MatchInfo(_message.Message):
    __slots__ = ("bot_id", "intent", "score", "rating")
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    bot_id: str
    intent: str
    score: float
    rating: _common_pb2.Rating
    def __init__(self, bot_id: _Optional[str] = ..., intent: _Optional[str] = ..., score: _Optional[float] = ..., rating: _Optional[_Union[_common_pb2.Rating, str]] = ...) -> None: ...

class RespondResponse(_message.Message):
    __slots__ = ("replies", "owner", "outcome", "match", "transfer_id", "options")
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[_common_pb2.Reply]
    owner: _common_pb2.BotRef
    outcome: Outcome
    match: MatchInfo
    transfer_id: str
    options: _containers.RepeatedCompositeFieldContainer[ClarifyOption]
    def __init__(self, replies: _Optional[_Iterable[_Union[_common_pb2.Reply, _Mapping]]] = ..., owner: _Optional[_Union[_common_pb2.BotRef, _Mapping]] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., match: _Optional[_Union[MatchInfo, _Mapping]] = ..., transfer_id: _Optional[str] = ..., options: _Optional[_Iterable[_Union[ClarifyOption, _Mapping]]] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("transfer_id", "conversation_id", "consumer_id", "text", "intent", "sender", "receiver_bot_id", "channel_metadata", "visited_bot_ids", "hop_count", "owner_version")
    class ChannelMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_BOT_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_METADATA_FIELD_NUMBER: _ClassVar[int]
    VISITED_BOT_IDS_FIELD_NUMBER: _ClassVar[int]
    HOP_COUNT_FIELD_NUMBER: _ClassVar[int]
    OWNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    conversation_id: str
    consumer_id: str
    text: str
    intent: str
    sender: _common_pb2.BotRef
    receiver_bot_id: str
    channel_metadata: _containers.ScalarMap[str, str]
    visited_bot_ids: _containers.RepeatedScalarFieldContainer[str]
    hop_count: int
    owner_version: int
    def __init__(self, transfer_id: _Optional[str] = ..., conversation_id: _Optional[str] = ..., consumer_id: _Optional[str] = ..., text: _Optional[str] = ..., intent: _Optional[str] = ..., sender: _Optional[_Union[_common_pb2.BotRef, _Mapping]] = ..., receiver_bot_id: _Optional[str] = ..., channel_metadata: _Optional[_Mapping[str, str]] = ..., visited_bot_ids: _Optional[_Iterable[str]] = ..., hop_count: _Optional[int] = ..., owner_version: _Optional[int] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("replies", "owner", "outcome", "match")
    REPLIES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    replies: _containers.RepeatedCompositeFieldContainer[_common_pb2.Reply]
    owner: _common_pb2.BotRef
    outcome: Outcome
    match: MatchInfo
    def __init__(self, replies: _Optional[_Iterable[_Union[_common_pb2.Reply, _Mapping]]] = ..., owner: _Optional[_Union[_common_pb2.BotRef, _Mapping]] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., match: _Optional[_Union[MatchInfo, _Mapping]] = ...) -> None: ...
