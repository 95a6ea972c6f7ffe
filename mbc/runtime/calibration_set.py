"""The calibration set's file format: utterances labelled with the bot and intent that should take
them, or with nothing ("none of these"); see router/calibration.py for what τ makes of them.

Pure parsing and writing (json only): the benchmarks and tools that write a set import it without
the router's model libraries."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class CalibrationError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    """One labelled utterance; empty bot_id means "none of these"."""

    text: str
    bot_id: str = ""
    intent: str = ""
    group: str = ""


def parse_calibration(text: str, source: str = "calibration set") -> list[Example]:
    """Examples from JSON Lines or a JSON array; raises CalibrationError naming the bad line."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("["):
        try:
            items = list(enumerate(json.loads(stripped), 1))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{source}: not valid JSON: {e}") from e
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{source}:{n}: not valid JSON: {e}") from e
    out = []
    for n, item in items:
        if not isinstance(item, dict):
            raise CalibrationError(f"{source}:{n}: expected an object with text, bot, intent")
        unknown = set(item) - {"text", "bot", "intent", "group"}
        if unknown:
            raise CalibrationError(f"{source}:{n}: unknown field(s) {', '.join(sorted(unknown))}")
        utterance = item.get("text")
        if not isinstance(utterance, str) or not utterance.strip():
            raise CalibrationError(f"{source}:{n}: text must be a non-empty string")
        bot = item.get("bot") or ""
        intent = item.get("intent") or ""
        group = item.get("group") or ""
        if not all(isinstance(v, str) for v in (bot, intent, group)):
            raise CalibrationError(f"{source}:{n}: bot, intent and group must be strings or null")
        if intent and not bot:
            raise CalibrationError(f"{source}:{n}: an intent needs its bot")
        out.append(Example(utterance.strip(), bot, intent, group))
    return out


def load_calibration(path: str | Path) -> list[Example]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read: {e.strerror}") from e
    return parse_calibration(text, str(path))


def dump_calibration(examples: Iterable[Example]) -> str:
    lines = []
    for e in examples:
        item = {"text": e.text, "bot": e.bot_id or None}
        if e.intent:
            item["intent"] = e.intent
        if e.group:
            item["group"] = e.group
        lines.append(json.dumps(item, ensure_ascii=False))
    return "\n".join(lines) + "\n"
