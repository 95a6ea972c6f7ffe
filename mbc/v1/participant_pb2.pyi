from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Intent(_message.Message):
    __slots__ = ("name", "phrases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHRASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    phrases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., phrases: _Optional[_Iterable[str]] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("bot_id", "instance_id", "address", "group", "collaboration", "intents", "definition_version", "software_version", "display_name")
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    COLLABORATION_FIELD_NUMBER: _ClassVar[int]
    INTENTS_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    bot_id: str
    instance_id: str
    address: str
    group: str
    collaboration: bool
    intents: _containers.RepeatedCompositeFieldContainer[Intent]
    definition_version: str
    software_version: str
    display_name: str
    def __init__(self, bot_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., address: _Optional[str] = ..., group: _Optional[str] = ..., collaboration: _Optional[bool] = ..., intents: _Optional[_Iterable[_Union[Intent, _Mapping]]] = ..., definition_version: _Optional[str] = ..., software_version: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class GroupSettings(_message.Message):
    __slots__ = ("return_to_sender", "unavailable_message", "decision_costs")
    RETURN_TO_SENDER_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DECISION_COSTS_FIELD_NUMBER: _ClassVar[int]
    return_to_sender: bool
    unavailable_message: str
    decision_costs: DecisionCosts
    def __init__(self, return_to_sender: _Optional[bool] = ..., unavailable_message: _Optional[str] = ..., decision_costs: _Optional[_Union[DecisionCosts, _Mapping]] = ...) -> None: ...

class DecisionCosts(_message.Message):
    __slots__ = ("wrong_transfer", "fallback", "clarify", "oos_share")
    WRONG_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CLARIFY_FIELD_NUMBER: _ClassVar[int]
    OOS_SHARE_FIELD_NUMBER: _ClassVar[int]
    wrong_transfer: float
    fallback: float
    clarify: float
    oos_share: float
    def __init__(self, wrong_transfer: _Optional[float] = ..., fallback: _Optional[float] = ..., clarify: _Optional[float] = ..., oos_share: _Optional[float] = ...) -> None: ...
