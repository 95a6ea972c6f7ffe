"""Bot definition files (YAML): who the bot is, its intents and its dialogs.

    id: personal-banking
    display_name: Personal Banking Assistant
    group: retail-bank
    collaboration: true
    transfer_message: "Let me bring in our {to_bot}."   # optional
    fallback: "Sorry, I can't help with that."
    intents:
      - name: check_balance
        phrases: ["what's my balance", ...]
    dialogs:
      - intent: check_balance
        responses: ["Your balance is ..."]
      - intent: greeting                  # a dialog may ask questions instead:
        steps:
          - ask: "What's your name?"       # waits for the consumer's next message...
            save_as: name                  # ...and stores it as a conversation variable
          - say: "Nice to meet you, {name}!"

Texts are templates: `{name}` reads a conversation variable from the Context Session Store
(namespace `context_namespace`, the group by default), `{name|there}` gives a default.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from discovery.keys import validate_name

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML has it: ten times faster than the pure Python one, which a
host of hundreds of definitions would wait on at start."""


class DefinitionError(ValueError):
    """A bot definition that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class IntentDefinition:
    name: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class Step:
    """Say `text`, or ask it and store the consumer's answer as variable `save_as`."""

    text: str
    save_as: str = ""

    @property
    def asks(self) -> bool:
        return bool(self.save_as)


@dataclass(frozen=True)
class DialogDefinition:
    intent: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class BotDefinition:
    bot_id: str
    display_name: str
    group: str
    collaboration: bool
    fallback: str
    transfer_message: str
    intents: tuple[IntentDefinition, ...]
    dialogs: tuple[DialogDefinition, ...]
    context_namespace: str

    @property
    def version(self) -> str:
        """A content hash: instances with equal versions have equal intents and dialogs."""
        payload = json.dumps(
            [
                self.bot_id,
                self.group,
                self.collaboration,
                [(i.name, i.phrases) for i in self.intents],
                [(d.intent, [(t.text, t.save_as) for t in d.steps]) for d in self.dialogs],
                self.fallback,
                self.transfer_message,
            ],
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def dialog_for(self, intent: str) -> DialogDefinition | None:
        return next((d for d in self.dialogs if d.intent == intent), None)

    @classmethod
    def from_file(cls, path: str | Path) -> BotDefinition:
        path = Path(path)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
        except OSError as e:
            raise DefinitionError(f"{path}: cannot read the bot definition: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise DefinitionError(f"{path}: not valid YAML: {e}") from e
        try:
            return cls.from_dict(data)
        except DefinitionError as e:
            raise DefinitionError(f"{path}: {e}") from e

    @classmethod
    def from_dict(cls, data: Any) -> BotDefinition:
        if not isinstance(data, dict):
            raise DefinitionError("a bot definition is a mapping with id, group, intents, dialogs and fallback")
        unknown = set(data) - {
            "id",
            "display_name",
            "group",
            "collaboration",
            "fallback",
            "transfer_message",
            "intents",
            "dialogs",
            "context_namespace",
        }
        if unknown:
            raise DefinitionError(f"unknown field(s): {', '.join(sorted(unknown))}")
        bot_id = _text(data, "id")
        group = _text(data, "group")
        for kind, value in (("id", bot_id), ("group", group)):
            try:
                validate_name(kind, value)
            except ValueError as e:
                raise DefinitionError(str(e)) from e
        collaboration = data.get("collaboration", True)
        if not isinstance(collaboration, bool):
            raise DefinitionError("collaboration must be true or false")
        intents = tuple(_intent(i, n) for n, i in enumerate(_list(data, "intents")))
        names = [i.name for i in intents]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DefinitionError(f"intent names must be unique; repeated: {', '.join(duplicates)}")
        dialogs = tuple(_dialog(d, n, set(names)) for n, d in enumerate(_list(data, "dialogs")))
        started = [d.intent for d in dialogs]
        missing = [n for n in names if n not in started]
        if missing:
            raise DefinitionError(f"intents without a dialog: {', '.join(missing)}")
        return cls(
            bot_id=bot_id,
            display_name=str(data.get("display_name") or bot_id),
            group=group,
            collaboration=collaboration,
            fallback=_text(data, "fallback"),
            transfer_message=str(data.get("transfer_message") or ""),
            intents=intents,
            dialogs=dialogs,
            context_namespace=str(data.get("context_namespace") or group),
        )


def definition_files(paths: Sequence[str | Path]) -> list[Path]:
    """The definition files that `paths` name: a file itself, a directory's *.yaml files (sorted)."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("*.yaml"))
            if not found:
                raise DefinitionError(f"{path}: a directory with no *.yaml bot definition")
            files += found
        else:
            files.append(path)
    if not files:
        raise DefinitionError("no bot definition given")
    return files


def _text(data: dict, field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DefinitionError(f"{field} is required and must be a non-empty string")
    return value.strip()


def _list(data: dict, field: str) -> list:
    value = data.get(field)
    if not isinstance(value, list) or not value:
        raise DefinitionError(f"{field} is required and must be a non-empty list")
    return value


def _intent(item: Any, position: int) -> IntentDefinition:
    if not isinstance(item, dict):
        raise DefinitionError(f"intents[{position}] must be a mapping with name and phrases")
    name = _text(item, "name")
    try:
        validate_name("intent name", name)
    except ValueError as e:
        raise DefinitionError(f"intents[{position}]: {e}") from e
    phrases = item.get("phrases")
    if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
        raise DefinitionError(f"intent {name!r}: phrases must be a non-empty list of non-empty strings")
    return IntentDefinition(name, tuple(dict.fromkeys(p.strip() for p in phrases)))


def _dialog(item: Any, position: int, intents: set[str]) -> DialogDefinition:
    if not isinstance(item, dict):
        raise DefinitionError(f"dialogs[{position}] must be a mapping with intent and responses")
    intent = _text(item, "intent")
    if intent not in intents:
        raise DefinitionError(f"dialogs[{position}] starts on intent {intent!r}, which is not defined")
    if ("responses" in item) == ("steps" in item):
        raise DefinitionError(f"dialog for {intent!r}: give either responses or steps")
    if "responses" in item:
        responses = item["responses"]
        if isinstance(responses, str):
            responses = [responses]
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) and r.strip() for r in responses):
            raise DefinitionError(f"dialog for {intent!r}: responses must be a non-empty list of strings")
        return DialogDefinition(intent, tuple(Step(r.strip()) for r in responses))
    steps = item["steps"]
    if not isinstance(steps, list) or not steps:
        raise DefinitionError(f"dialog for {intent!r}: steps must be a non-empty list")
    return DialogDefinition(intent, tuple(_step(intent, n, step) for n, step in enumerate(steps)))


def _step(intent: str, position: int, step: Any) -> Step:
    where = f"dialog for {intent!r}, steps[{position}]"
    if not isinstance(step, dict) or len({"say", "ask"} & set(step)) != 1:
        raise DefinitionError(f"{where}: a step is either say: TEXT or ask: TEXT with save_as: NAME")
    text = step.get("say") or step.get("ask")
    if not isinstance(text, str) or not text.strip():
        raise DefinitionError(f"{where}: the text must be a non-empty string")
    if "ask" in step:
        save_as = step.get("save_as")
        if not isinstance(save_as, str) or not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,63}$", save_as):
            raise DefinitionError(f"{where}: ask needs save_as: a variable name (letters, digits, '_')")
        return Step(text.strip(), save_as)
    return Step(text.strip())
