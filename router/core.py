"""The router's domain logic: keep one intent catalog per group in step with etcd, answer matches.

Catalogs are rebuilt aside (phrase embeddings come from the encoder's cache when unchanged) and
swapped in whole, so `match` keeps answering from the previous catalogs during a rebuild.
Snapshots that arrive during a rebuild are coalesced: only the latest one is built next.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping

from mbc.config import RouterConfig
from mbc.encoder import Encoder
from mbc.logs import get_logger
from mbc.matching import IntentCatalog, IntentPhrases, ScoredIntent
from router.directory import BotEntry, Directory

log = get_logger(__name__)


class NotReady(Exception):
    """No participant snapshot has been indexed yet."""


class UnknownBot(Exception):
    pass


class GroupMismatch(Exception):
    pass


@dataclass(frozen=True)
class Candidate:
    match: ScoredIntent
    display_name: str
    instance_id: str
    address: str


@dataclass(frozen=True)
class _State:
    directory: Directory
    catalogs: Mapping[str, IntentCatalog]
    sources: Mapping[str, tuple[IntentPhrases, ...]]


class RouterCore:
    def __init__(self, config: RouterConfig, encoder: Encoder) -> None:
        self.config = config
        self.encoder = encoder
        self._state: _State | None = None
        self._pending: tuple[Mapping, int] | None = None
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        self._builder: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def directory(self) -> Directory | None:
        return self._state.directory if self._state else None

    def submit(self, participants: Mapping, revision: int) -> None:
        """Queue a participant snapshot for indexing (the latest one wins)."""
        self._pending = (participants, revision)
        self._wakeup.set()
        if self._builder is None or self._builder.done():
            self._builder = asyncio.get_running_loop().create_task(self._build_loop())

    async def close(self) -> None:
        if self._builder:
            self._builder.cancel()
            await asyncio.gather(self._builder, return_exceptions=True)

    async def _build_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            participants, revision = self._pending
            try:
                await self._rebuild(Directory.from_participants(participants, revision))
            except Exception:
                log.exception("index_build_failed", revision=revision)

    async def _rebuild(self, directory: Directory) -> None:
        old = self._state
        catalogs: dict[str, IntentCatalog] = {}
        sources: dict[str, tuple[IntentPhrases, ...]] = {}
        rebuilt = []
        for group in directory.groups:
            intents = directory.candidates_of(group)
            sources[group] = intents
            if old and old.sources.get(group) == intents:
                catalogs[group] = old.catalogs[group]
                continue
            vectors = await self.encoder.aencode_phrases(IntentCatalog.phrases_of(intents))
            catalogs[group] = IntentCatalog(intents, vectors, self.encoder.dim)
            rebuilt.append(group)
        self._state = _State(directory, catalogs, sources)
        self._ready.set()
        log.info(
            "index_swapped",
            revision=directory.revision,
            groups=len(catalogs),
            rebuilt_groups=rebuilt,
            phrases=sum(len(c) for c in catalogs.values()),
            bots=sum(len(b) for b in directory.groups.values()),
        )

    async def match(self, text: str, bot_id: str, group: str, limit: int, min_rating: int) -> tuple[list[Candidate], int]:
        state = self._state
        if state is None:
            raise NotReady("the router has not indexed the participants yet")
        if bot_id:
            asker = state.directory.find_bot(bot_id)
            if asker is None:
                raise UnknownBot(f"bot {bot_id!r} is not a registered participant")
            if group and group != asker.group:
                raise GroupMismatch(f"bot {bot_id!r} belongs to group {asker.group!r}, not {group!r}")
            group = asker.group
        groups = [group] if group else sorted(state.catalogs)
        query = (await self.encoder.aencode([text]))[0]
        ranked: list[ScoredIntent] = []
        for name in groups:
            catalog = state.catalogs.get(name)
            if catalog is not None:
                ranked += catalog.rank(query, self.config.ratings, self.config.neighbours, limit, exclude_bot=bot_id or None)
        ranked.sort(key=lambda m: -m.score)
        out = []
        for m in ranked:
            if m.rating < min_rating:
                continue
            bot: BotEntry | None = state.directory.find_bot(m.bot_id)
            if bot is None or not bot.instances:
                continue
            instance_id, address = bot.pick_instance()
            out.append(Candidate(m, bot.display_name, instance_id, address))
            if len(out) >= limit:
                break
        return out, state.directory.revision
