"""A bot: its definition plus optional Python handlers for business logic.

    bot = Bot.from_file("examples/cards.yaml")

    @bot.on_intent("card_declined")
    async def declined(turn: Turn) -> str:
        return f"I checked card {lookup(turn.consumer_id)}: ..."

A handler returns a string or a list of strings; without one, the dialog's responses are sent.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence, Union

from bot_server.definition import BotDefinition, DefinitionError


@dataclass(frozen=True)
class Turn:
    """What a handler knows about the message it answers."""

    conversation_id: str
    consumer_id: str
    text: str
    intent: str
    score: float
    channel_metadata: Mapping[str, str] = field(default_factory=dict)
    transferred_from: str = ""
    """The bot that handed this conversation over, when it arrived by transfer."""


HandlerResult = Union[str, Sequence[str]]
Handler = Callable[[Turn], Union[HandlerResult, Awaitable[HandlerResult]]]


class Bot:
    def __init__(self, definition: BotDefinition) -> None:
        self.definition = definition
        self._handlers: dict[str, Handler] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> "Bot":
        return cls(BotDefinition.from_file(path))

    @property
    def bot_id(self) -> str:
        return self.definition.bot_id

    def on_intent(self, intent: str) -> Callable[[Handler], Handler]:
        """Attach code to an intent's dialog; it runs instead of the dialog's static responses."""
        if intent not in {i.name for i in self.definition.intents}:
            raise DefinitionError(f"bot {self.bot_id!r} has no intent {intent!r}")

        def register(handler: Handler) -> Handler:
            self._handlers[intent] = handler
            return handler

        return register

    async def run_dialog(self, turn: Turn) -> list[str]:
        """The messages the dialog of `turn.intent` sends."""
        handler = self._handlers.get(turn.intent)
        if handler is None:
            dialog = self.definition.dialog_for(turn.intent)
            return list(dialog.responses) if dialog else [self.definition.fallback]
        result = handler(turn)
        if inspect.isawaitable(result):
            result = await result
        return [result] if isinstance(result, str) else [str(r) for r in result]
