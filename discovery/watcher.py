"""Follows the registered participants and the bots' definitions: list both prefixes at one
revision, then watch them, and re-list after any error. Each instance record (address, versions)
is joined with its bot's definition (intents), so that routers see full Participants."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import DecodeError

from discovery.background import BackgroundLoop
from discovery.errors import EtcdLimitExceeded, EtcdUnavailable, WatchCompacted
from discovery.etcd_client import EtcdClient, KeyValue, WatchEvent
from discovery.keys import (
    DEFINITIONS_PREFIX,
    PARTICIPANTS_PREFIX,
    definition_key,
    parse_definition_key,
    parse_participant_key,
)
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2

log = get_logger(__name__)

_RETRY_FIRST = 0.2
_RETRY_CAP = 2.0

Participant = participant_pb2.Participant


@dataclass(frozen=True)
class ParticipantSnapshot:
    """The registrations under the watched prefixes as of store revision `revision`.

    `participants` holds the valid live instances, each joined with its bot's definition (a full
    Participant: intents included), `definitions` the valid bot definitions (which outlive the
    instances: a bot with a definition and no instance is absent, not gone), and `invalid` the
    reason each other key was rejected (an instance waiting for its definition included), all keyed
    by etcd key. Treat the Participant
    messages as read-only.
    """

    participants: Mapping[str, Participant] = field(default_factory=lambda: MappingProxyType({}))
    invalid: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    definitions: Mapping[str, Participant] = field(default_factory=lambda: MappingProxyType({}))


def _parse_record(
    key: str, value: bytes, parse_key: Callable[[str], tuple[str, ...]], names: tuple[str, ...]
) -> Participant | str:
    """The Participant serialized in `value`, its `names` fields equal to the segments of `key`
    (parsed by `parse_key`), or why not."""
    try:
        segments = parse_key(key)
    except ValueError as e:
        return str(e)
    record = Participant()
    try:
        record.ParseFromString(value)
    except DecodeError:
        return "value is not a serialized mbc.v1.Participant"
    for name, segment in zip(names, segments):
        if getattr(record, name) != segment:
            return f"{name} {getattr(record, name)!r} does not match the key segment {segment!r}"
    return record


def check_registration(key: str, value: bytes) -> Participant | str:
    """Return the Participant registered under `key`, or why the registration is invalid."""
    participant = _parse_record(key, value, parse_participant_key, ("group", "bot_id", "instance_id"))
    if isinstance(participant, Participant) and not participant.address.strip():
        return "address is empty"
    return participant


def check_definition(key: str, value: bytes) -> Participant | str:
    """Return the bot definition stored under `key`, or why it is invalid."""
    definition = _parse_record(key, value, parse_definition_key, ("group", "bot_id"))
    if isinstance(definition, Participant) and (definition.instance_id or definition.address):
        return "a definition names no instance and no address"
    return definition


def join(record: Participant, definition: Participant | None) -> Participant | str:
    """The full Participant of an instance: its record (address, versions) joined with its bot's
    definition (intents, phrases, display name, collaboration), or why it cannot be yet.

    A record that carries intents itself (written by a version of mbc that put the whole
    Participant under the instance key: a rolling upgrade) is taken as it is. Any other record is
    invalid until its bot's definition is in etcd: an instance whose definition was lost (forgotten
    while the instance lived) or is not written yet is not routed to, rather than routed with
    intents nobody can vouch for; its registration puts the definition again when it renews.
    """
    if record.intents:
        return record
    if definition is None:
        return (
            f"no definition of bot {record.bot_id!r} in group {record.group!r} "
            f"({definition_key(record.group, record.bot_id)}): ignored until it is written"
        )
    joined = Participant()
    joined.CopyFrom(definition)
    joined.instance_id = record.instance_id
    joined.address = record.address
    joined.software_version = record.software_version
    if record.definition_version:
        joined.definition_version = record.definition_version
    return joined


class _Registry:
    """Instance records and definitions as read from etcd, with each instance joined to its bot's
    definition (re-joined only when one of the two changes)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, Participant] = {}
        self.definitions: dict[str, Participant] = {}
        self.joined: dict[str, Participant] = {}
        self.invalid: dict[str, str] = {}
        self.waiting: dict[str, str] = {}
        self._instances: dict[str, set[str]] = {}
        """Instance keys by the definition key of their bot."""

    def load(self, items: list[KeyValue]) -> None:
        invalid_before, waiting_before = self.invalid, self.waiting
        self._reset()
        for kv in items:
            self._store(kv.key, kv.value, invalid_before.get(kv.key))
        for key in self.records:
            self._join(key, waiting_before.get(key))

    def put(self, key: str, value: bytes) -> None:
        previous_reason = self.invalid.pop(key, None)
        if key.startswith(DEFINITIONS_PREFIX):
            self.definitions.pop(key, None)
            self._store(key, value, previous_reason)
            self._rejoin(key)
            return
        record = self.records.pop(key, None)
        if record is not None:
            self._instances.get(definition_key(record.group, record.bot_id), set()).discard(key)
        if self._store(key, value, previous_reason):
            self._join(key, self.waiting.get(key))
        else:
            self._drop(key)

    def delete(self, key: str) -> None:
        self.invalid.pop(key, None)
        if key.startswith(DEFINITIONS_PREFIX):
            if self.definitions.pop(key, None) is not None:
                log.info("definition_removed", key=key)
            self._rejoin(key)
            return
        record = self.records.pop(key, None)
        if record is not None:
            self._instances.get(definition_key(record.group, record.bot_id), set()).discard(key)
        self._drop(key)

    def snapshot(self, revision: int) -> ParticipantSnapshot:
        return ParticipantSnapshot(
            MappingProxyType(dict(self.joined)),
            MappingProxyType({**self.invalid, **self.waiting}),
            revision,
            MappingProxyType(dict(self.definitions)),
        )

    def _store(self, key: str, value: bytes, previous_reason: str | None) -> bool:
        """Record the key as a valid record or definition, or as invalid; warn once per key and reason."""
        definition = key.startswith(DEFINITIONS_PREFIX)
        result = check_definition(key, value) if definition else check_registration(key, value)
        if isinstance(result, str):
            self.invalid[key] = result
            if previous_reason != result:
                log.warning("invalid_registration", key=key, reason=result)
            return False
        if definition:
            self.definitions[key] = result
        else:
            self.records[key] = result
            self._instances.setdefault(definition_key(result.group, result.bot_id), set()).add(key)
        return True

    def _drop(self, key: str) -> None:
        """`key` is no longer a valid instance: out of the snapshot's participants."""
        self.waiting.pop(key, None)
        if self.joined.pop(key, None) is not None:
            log.info("participant_removed", key=key)

    def _rejoin(self, key: str) -> None:
        """Join every instance of the bot of definition `key` again (its definition changed)."""
        for instance in sorted(self._instances.get(key, ())):
            self._join(instance, self.waiting.get(instance))

    def _join(self, key: str, previous_reason: str | None) -> None:
        record = self.records[key]
        result = join(record, self.definitions.get(definition_key(record.group, record.bot_id)))
        known = key in self.joined
        if isinstance(result, str):
            self.waiting[key] = result
            if self.joined.pop(key, None) is not None:
                log.info("participant_removed", key=key, reason=result)
            if previous_reason != result:
                log.info("registration_waiting_for_definition", key=key, reason=result)
            return
        self.waiting.pop(key, None)
        self.joined[key] = result
        if not known:
            log.info("participant_added", key=key)


async def read_participants(client: EtcdClient, prefix: str = PARTICIPANTS_PREFIX) -> ParticipantSnapshot:
    """The registrations under `prefix` and the definitions of the same scope, read once (at one
    revision) and joined as the watcher joins them."""
    (items, definitions), revision = await client.get_prefixes([prefix, definitions_prefix_of(prefix)])
    registry = _Registry()
    registry.load(items + definitions)
    return registry.snapshot(revision)


def definitions_prefix_of(prefix: str) -> str:
    """The definitions prefix that goes with a participants prefix (the whole mesh, or a group)."""
    if not prefix.startswith(PARTICIPANTS_PREFIX):
        raise ValueError(f"prefix {prefix!r} is not under {PARTICIPANTS_PREFIX}")
    return DEFINITIONS_PREFIX + prefix[len(PARTICIPANTS_PREFIX) :]


class ParticipantWatcher(BackgroundLoop):
    """Calls `on_change` with a new ParticipantSnapshot after the first list and after each change.

    Changes that arrive together (one etcd response, or while on_change runs) give one snapshot.
    On a compacted watch or an unreachable etcd it backs off, lists again and resumes; it only
    stops when stop() is called. Keys are parsed as full participant keys, so `prefix` may narrow
    the watch to a group (PARTICIPANTS_PREFIX + "group/"); the definitions of the same scope are
    listed (in the same transaction: one revision) and watched beside them.
    """

    def __init__(
        self,
        client: EtcdClient,
        on_change: Callable[[ParticipantSnapshot], Awaitable[None] | None],
        prefix: str = PARTICIPANTS_PREFIX,
    ) -> None:
        self._client = client
        self._on_change = on_change
        self._prefix = prefix
        self._definitions_prefix = definitions_prefix_of(prefix)
        self._registry = _Registry()
        self._revision = 0
        self._snapshot = ParticipantSnapshot()
        self._ready = asyncio.Event()
        self._failures = 0
        self.task_name = f"participant-watcher {prefix}"

    @property
    def snapshot(self) -> ParticipantSnapshot:
        """The latest snapshot (empty, with revision 0, until the first list)."""
        return self._snapshot

    @property
    def prefix(self) -> str:
        return self._prefix

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the first snapshot has been delivered; TimeoutError after `timeout` seconds."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self) -> None:
        while True:
            try:
                await self._list_and_watch()
            except WatchCompacted as e:
                log.warning("watch_compacted", prefix=self._prefix, compact_revision=e.compact_revision)
            except EtcdLimitExceeded as e:
                # Lists are paged, so only a single value over the receive limit gets here.
                log.error("watch_list_over_limit", prefix=self._prefix, error=str(e), attempt=self._failures + 1)
            except EtcdUnavailable as e:
                # Warn once per outage; the retries that follow are debug.
                level = log.warning if self._failures == 0 else log.debug
                level("watch_interrupted", prefix=self._prefix, error=str(e), attempt=self._failures + 1)
            except Exception as e:
                log.exception("watcher_failed", prefix=self._prefix, error=repr(e))
            self._failures += 1
            delay = min(_RETRY_CAP, _RETRY_FIRST * 2 ** (self._failures - 1))
            log.debug("watch_resuming", prefix=self._prefix, retry_in=delay, attempt=self._failures)
            await asyncio.sleep(delay)

    async def _list_and_watch(self) -> None:
        (items, definitions), revision = await self._client.get_prefixes([self._prefix, self._definitions_prefix])
        self._load(items + definitions, revision)
        log.info(
            "participants_listed",
            prefix=self._prefix,
            revision=revision,
            participants=len(self._registry.joined),
            definitions=len(self._registry.definitions),
            invalid=len(self._registry.invalid),
            waiting_for_definition=len(self._registry.waiting),
            after_failures=self._failures,
        )
        self._failures = 0
        await self._publish()
        queue: asyncio.Queue[WatchEvent | Exception] = asyncio.Queue()
        # One watch per prefix into one queue: the keys differ, so each key's events stay in order.
        pumps = [
            asyncio.create_task(self._pump(prefix, revision + 1, queue), name=f"watch-pump {prefix}")
            for prefix in (self._prefix, self._definitions_prefix)
        ]
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                events = [item for item in batch if isinstance(item, WatchEvent)]
                for event in events:
                    self._apply(event)
                if events:
                    await self._publish()
                for item in batch:
                    if isinstance(item, Exception):
                        raise item
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps)

    async def _pump(self, prefix: str, start_revision: int, queue: asyncio.Queue[WatchEvent | Exception]) -> None:
        try:
            async with contextlib.aclosing(self._client.watch_prefix(prefix, start_revision)) as events:
                async for event in events:
                    queue.put_nowait(event)
            queue.put_nowait(EtcdUnavailable("the watch ended"))
        except Exception as e:
            queue.put_nowait(e)

    def _load(self, items: list[KeyValue], revision: int) -> None:
        before = set(self._registry.joined)
        self._registry.load(items)
        self._revision = revision
        after = set(self._registry.joined)
        for key in sorted(before - after):
            log.info("participant_removed", key=key)
        for key in sorted(after - before):
            log.info("participant_added", key=key)

    def _apply(self, event: WatchEvent) -> None:
        self._revision = max(self._revision, event.mod_revision)
        if event.kind == "delete":
            self._registry.delete(event.key)
        else:
            self._registry.put(event.key, event.value)

    async def _publish(self) -> None:
        self._snapshot = self._registry.snapshot(self._revision)
        try:
            result = self._on_change(self._snapshot)
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            log.exception("on_change_failed", prefix=self._prefix, revision=self._revision, error=repr(e))
        self._ready.set()
