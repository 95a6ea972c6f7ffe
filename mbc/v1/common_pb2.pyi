from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Rating(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATING_UNSPECIFIED: _ClassVar[Rating]
    RATING_POOR: _ClassVar[Rating]
    RATING_FAIR: _ClassVar[Rating]
    RATING_FAIR_PLUS: _ClassVar[Rating]
    RATING_GOOD: _ClassVar[Rating]
    RATING_VERY_GOOD: _ClassVar[Rating]
RATING_UNSPECIFIED: Rating
RATING_POOR: Rating
RATING_FAIR: Rating
RATING_FAIR_PLUS: Rating
RATING_GOOD: Rating
RATING_VERY_GOOD: Rating

class BotRef(_message.Message):
    __slots__ = ("bot_id", "instance_id", "address", "group")
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    bot_id: str
    instance_id: str
    address: str
    group: str
    def __init__(self, bot_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., address: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("bot_id", "text")
    BOT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    bot_id: str
    text: str
    def __init__(self, bot_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...
