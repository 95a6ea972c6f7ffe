"""The router's view of the mesh: participants grouped by bot group, from an etcd snapshot.

A bot with a definition in etcd and no live instance is *absent*: its entry has no instances. Its
intents stay in its group's model (a crash or a restart changes neither the model nor τ), but it is
never a candidate; a Match whose best intent is its own answers that it is unavailable."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from mbc.runtime.logs import get_logger
from mbc.runtime.matching import IntentPhrases
from mbc.v1 import participant_pb2

log = get_logger(__name__)


@dataclass
class BotEntry:
    """A bot as the router sees it: its intents and its live instances (none: the bot is absent)."""

    bot_id: str
    group: str
    collaboration: bool
    intents: tuple[IntentPhrases, ...]
    definition_version: str
    display_name: str
    instances: list[tuple[str, str]] = field(default_factory=list)
    """(instance_id, address) of each live instance."""
    _turn: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def absent(self) -> bool:
        """Known by its definition, but no instance is live (crashed, restarting, being deployed)."""
        return not self.instances

    def pick_instance(self) -> tuple[str, str]:
        """Spread transfers over the live instances, round-robin."""
        return self.instances[next(self._turn) % len(self.instances)]

    def instances_in_turn(self) -> list[tuple[str, str]]:
        """Every live instance, starting with the one whose turn it is (round-robin, as transfers)."""
        if not self.instances:
            return []
        start = next(self._turn) % len(self.instances)
        return self.instances[start:] + self.instances[:start]


@dataclass(frozen=True)
class Directory:
    """Bots by group, built from the participants registered in etcd."""

    groups: Mapping[str, Mapping[str, BotEntry]]
    revision: int
    parsed: Mapping[str, tuple[participant_pb2.Participant, tuple[IntentPhrases, ...]]] = field(default_factory=dict)
    """Per key, the participant record and its intents as read from it."""

    @classmethod
    def from_participants(
        cls,
        participants: Mapping[str, participant_pb2.Participant],
        revision: int,
        max_intents: int | None = None,
        previous: Directory | None = None,
        definitions: Mapping[str, participant_pb2.Participant] | None = None,
    ) -> Directory:
        """Participants with more than `max_intents` intents are left out (and logged). The intents
        of a record that is the very object `previous` read are taken from it: with a million
        phrases, reading them all again took most of the time a participant change needs.

        `definitions` (by definition key) add the bots that have no live instance, as absent
        entries. A bot with live instances takes its intents from them, whatever its definition
        says (a new version rolling out)."""
        groups: dict[str, dict[str, BotEntry]] = {}
        parsed: dict[str, tuple[participant_pb2.Participant, tuple[IntentPhrases, ...]]] = {}
        known = previous.parsed if previous is not None else {}

        def entry_of(key: str, p: participant_pb2.Participant) -> BotEntry:
            source, intents = known.get(key, (None, ()))
            if source is not p:
                intents = tuple(IntentPhrases(p.bot_id, i.name, tuple(dict.fromkeys(i.phrases))) for i in p.intents)
            parsed[key] = (p, intents)
            return BotEntry(
                bot_id=p.bot_id,
                group=p.group,
                collaboration=p.collaboration,
                intents=intents,
                definition_version=p.definition_version,
                display_name=p.display_name or p.bot_id,
            )

        def too_many(key: str, p: participant_pb2.Participant) -> bool:
            if max_intents is not None and len(p.intents) > max_intents:
                log.warning("participant_ignored", key=key, reason=f"{len(p.intents)} intents; the maximum is {max_intents}")
                return True
            return False

        # Iterate by key so the instance list (and the chosen intents) do not depend on dict order.
        for key in sorted(participants):
            p = participants[key]
            if too_many(key, p):
                continue
            bots = groups.setdefault(p.group, {})
            entry = bots.get(p.bot_id)
            if entry is None:
                entry = bots[p.bot_id] = entry_of(key, p)
            entry.instances.append((p.instance_id, p.address))
        for key in sorted(definitions or {}):
            d = (definitions or {})[key]
            if d.bot_id in groups.get(d.group, {}) or too_many(key, d):
                continue
            groups.setdefault(d.group, {})[d.bot_id] = entry_of(key, d)
        return cls(groups=groups, revision=revision, parsed=parsed)

    def find_bot(self, bot_id: str, group: str) -> BotEntry | None:
        """The bot `bot_id` of `group`. Bot ids are unique within a group only: two groups may
        both run a bot `faq`, so a lookup always names the group."""
        return self.groups.get(group, {}).get(bot_id)

    def locate(self, bot_id: str, group: str) -> BotEntry | None:
        """The bot `bot_id` of `group`, or with `group` empty of the one group that has it; None
        when unknown. Raises LookupError, naming the groups, when several groups have it."""
        if group:
            return self.find_bot(bot_id, group)
        found = self.groups_of(bot_id)
        if len(found) > 1:
            raise LookupError(f"bot {bot_id!r} is in groups {', '.join(map(repr, found))}: name its group")
        return self.find_bot(bot_id, found[0]) if found else None

    def groups_of(self, bot_id: str) -> list[str]:
        """The groups that have a bot `bot_id` (sorted): none, one, or several."""
        return sorted(group for group, bots in self.groups.items() if bot_id in bots)

    def candidates_of(self, group: str) -> tuple[IntentPhrases, ...]:
        """The intents that may take a transfer in a group: those of collaborating bots."""
        return tuple(
            intent
            for bot in sorted(self.groups.get(group, {}).values(), key=lambda b: b.bot_id)
            if bot.collaboration
            for intent in bot.intents
        )
