from mbc.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ACT: _ClassVar[Decision]
    DECISION_DISAMBIGUATE: _ClassVar[Decision]
    DECISION_NONE: _ClassVar[Decision]

class NoneReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE_REASON_UNSPECIFIED: _ClassVar[NoneReason]
    NONE_REASON_BOT_UNAVAILABLE: _ClassVar[NoneReason]
DECISION_UNSPECIFIED: Decision
DECISION_ACT: Decision
DECISION_DISAMBIGUATE: Decision
DECISION_NONE: Decision
NONE_REASON_UNSPECIFIED: NoneReason
NONE_REASON_BOT_UNAVAILABLE: NoneReason

class LocateRequest(_message.Message):
    __slots__ = ("group", "bot_id")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    group: str
    bot_id: str
    def __init__(self, group: _Optional[str] = ..., bot_id: _Optional[str] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_common_pb2.BotRef]
    def __init__(self, instances: _Optional[_Iterable[_Union[_common_pb2.BotRef, _Mapping]]] = ...) -> None: ...

class MatchRequest(_message.Message):
    __slots__ = ("text", "bot_id", "group", "max_candidates", "min_rating", "include_asking_bot")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MIN_RATING_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ASKING_BOT_FIELD_NUMBER: _ClassVar[int]
    text: str
    bot_id: str
    group: str
    max_candidates: int
    min_rating: _common_pb2.Rating
    include_asking_bot: bool
    def __init__(self, text: _Optional[str] = ..., bot_id: _Optional[str] = ..., group: _Optional[str] = ..., max_candidates: _Optional[int] = ..., min_rating: _Optional[_Union[_common_pb2.Rating, str]] = ..., include_asking_bot: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("bot_id", "intent", "score", "rating", "address", "instance_id", "matched_phrase", "display_name", "confidence")
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MATCHED_PHRASE_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    bot_id: str
    intent: str
    score: float
    rating: _common_pb2.Rating
    address: str
    instance_id: str
    matched_phrase: str
    display_name: str
    confidence: float
    def __init__(self, bot_id: _Optional[str] = ..., intent: _Optional[str] = ..., score: _Optional[float] = ..., rating: _Optional[_Union[_common_pb2.Rating, str]] = ..., address: _Optional[str] = ..., instance_id: _Optional[str] = ..., matched_phrase: _Optional[str] = ..., display_name: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class MatchResponse(_message.Message):
    __slots__ = ("candidates", "index_revision", "decision", "none_reason", "unavailable_bot_id")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    INDEX_REVISION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    NONE_REASON_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_BOT_ID_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    index_revision: int
    decision: Decision
    none_reason: NoneReason
    unavailable_bot_id: str
    def __init__(self, candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., index_revision: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., none_reason: _Optional[_Union[NoneReason, str]] = ..., unavailable_bot_id: _Optional[str] = ...) -> None: ...
