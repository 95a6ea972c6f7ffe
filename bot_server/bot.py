"""A bot: its definition plus optional Python handlers for business logic.

    bot = Bot.from_file("examples/cards.yaml")

    @bot.on_intent("card_declined")
    async def declined(turn: Turn) -> str:
        await turn.remember("last_topic", "declined card")
        return f"Hi {turn.variables.get('name', 'there')}, I checked your card: ..."

A handler returns a string or a list of strings; without one, the dialog's steps run.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot_server.definition import BotDefinition, DefinitionError, DialogDefinition, definition_files

_VARIABLE = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)(?:\|([^}]*))?\}")


def render(template: str, variables: Mapping[str, Any]) -> str:
    """Fill `{name}` and `{name|default}` from the conversation's variables."""

    def value(m: re.Match) -> str:
        found = variables.get(m.group(1))
        return str(found) if found not in (None, "") else (m.group(2) or "")

    return _VARIABLE.sub(value, template)


def mentions_variables(template: str) -> bool:
    """Whether `render` fills anything in `template` from the variables."""
    return _VARIABLE.search(template) is not None


def dialog_texts(dialog: DialogDefinition, start_step: int, variables: Mapping[str, Any]) -> tuple[list[str], int | None]:
    """The texts a dialog says from `start_step` on, rendered: up to and including its first step
    that asks, whose index comes second (None when no step asks)."""
    texts = []
    for index in range(start_step, len(dialog.steps)):
        texts.append(render(dialog.steps[index].text, variables))
        if dialog.steps[index].asks:
            return texts, index
    return texts, None


async def _no_store(name: str, value: Any) -> None:
    raise RuntimeError("this turn has no conversation state")


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
    variables: Mapping[str, Any] = field(default_factory=dict)
    """The conversation's variables in the Context Session Store, as read for this turn."""
    remember: Callable[[str, Any], Awaitable[None]] = _no_store
    """Store a conversation variable (visible to every bot of the group)."""


HandlerResult = str | Sequence[str]
Handler = Callable[[Turn], HandlerResult | Awaitable[HandlerResult]]


class Bot:
    def __init__(self, definition: BotDefinition) -> None:
        self.definition = definition
        self._handlers: dict[str, Handler] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> Bot:
        return cls(BotDefinition.from_file(path))

    @property
    def bot_id(self) -> str:
        return self.definition.bot_id

    def on_intent(self, intent: str) -> Callable[[Handler], Handler]:
        """Attach code to an intent's dialog; it runs instead of the dialog's steps."""
        if intent not in {i.name for i in self.definition.intents}:
            raise DefinitionError(f"bot {self.bot_id!r} has no intent {intent!r}")

        def register(handler: Handler) -> Handler:
            self._handlers[intent] = handler
            return handler

        return register

    def handler_for(self, intent: str) -> Handler | None:
        return self._handlers.get(intent)

    @staticmethod
    async def call(handler: Handler, turn: Turn) -> list[str]:
        result = handler(turn)
        if inspect.isawaitable(result):
            result = await result
        return [result] if isinstance(result, str) else [str(r) for r in result]


def load_bots(paths: Sequence[str | Path]) -> list[Bot]:
    """The bots defined by `paths` (files, or directories of *.yaml), for one host: each bot id once."""
    bots: dict[str, tuple[Bot, Path]] = {}
    for path in definition_files(paths):
        bot = Bot.from_file(path)
        if bot.bot_id in bots:
            raise DefinitionError(
                f"bot {bot.bot_id!r} is defined twice ({bots[bot.bot_id][1]} and {path}): a process hosts each bot id once"
            )
        bots[bot.bot_id] = (bot, path)
    return [bot for bot, _ in bots.values()]
