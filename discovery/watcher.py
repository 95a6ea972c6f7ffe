"""Follows the registered participants: list the prefix, then watch it, and re-list after any error."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import DecodeError

from discovery.errors import EtcdUnavailable, WatchCompacted
from discovery.etcd_client import EtcdClient, KeyValue, WatchEvent
from discovery.keys import PARTICIPANTS_PREFIX, parse_participant_key
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2

log = get_logger(__name__)

_RETRY_FIRST = 0.2
_RETRY_CAP = 2.0

Participant = participant_pb2.Participant


@dataclass(frozen=True)
class ParticipantSnapshot:
    """The registrations under the watched prefix as of store revision `revision`.

    `participants` holds the valid ones and `invalid` the reason each other one was rejected,
    both keyed by etcd key. Treat the Participant messages as read-only.
    """

    participants: Mapping[str, Participant] = field(default_factory=lambda: MappingProxyType({}))
    invalid: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0


def check_registration(key: str, value: bytes) -> Participant | str:
    """Return the Participant registered under `key`, or why the registration is invalid."""
    try:
        segments = parse_participant_key(key)
    except ValueError as e:
        return str(e)
    participant = Participant()
    try:
        participant.ParseFromString(value)
    except DecodeError:
        return "value is not a serialized mbc.v1.Participant"
    for name, segment in zip(("group", "bot_id", "instance_id"), segments):
        if getattr(participant, name) != segment:
            return f"{name} {getattr(participant, name)!r} does not match the key segment {segment!r}"
    if not participant.address.strip():
        return "address is empty"
    return participant


class ParticipantWatcher:
    """Calls `on_change` with a new ParticipantSnapshot after the first list and after each change.

    Changes that arrive together (one etcd response, or while on_change runs) give one snapshot.
    On a compacted watch or an unreachable etcd it backs off, lists again and resumes; it only
    stops when stop() is called. Keys are parsed as full participant keys, so `prefix` may narrow
    the watch to a group (PARTICIPANTS_PREFIX + "group/").
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
        self._valid: dict[str, Participant] = {}
        self._invalid: dict[str, str] = {}
        self._revision = 0
        self._snapshot = ParticipantSnapshot()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    @property
    def snapshot(self) -> ParticipantSnapshot:
        """The latest snapshot (empty, with revision 0, until the first list)."""
        return self._snapshot

    @property
    def prefix(self) -> str:
        return self._prefix

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"participant-watcher {self._prefix}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the first snapshot has been delivered; TimeoutError after `timeout` seconds."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self) -> None:
        while True:
            try:
                await self._list_and_watch()
            except WatchCompacted as e:
                log.warning("watch_compacted", prefix=self._prefix, compact_revision=e.compact_revision)
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
        items, revision = await self._client.get_prefix(self._prefix)
        self._load(items, revision)
        log.info(
            "participants_listed",
            prefix=self._prefix,
            revision=revision,
            participants=len(self._valid),
            invalid=len(self._invalid),
            after_failures=self._failures,
        )
        self._failures = 0
        await self._publish()
        queue: asyncio.Queue[WatchEvent | Exception] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(revision + 1, queue), name=f"watch-pump {self._prefix}")
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
            pump.cancel()
            await asyncio.wait({pump})

    async def _pump(self, start_revision: int, queue: asyncio.Queue[WatchEvent | Exception]) -> None:
        try:
            async with contextlib.aclosing(self._client.watch_prefix(self._prefix, start_revision)) as events:
                async for event in events:
                    queue.put_nowait(event)
            queue.put_nowait(EtcdUnavailable("the watch ended"))
        except Exception as e:
            queue.put_nowait(e)

    def _load(self, items: list[KeyValue], revision: int) -> None:
        before = set(self._valid)
        invalid_before = self._invalid
        self._valid, self._invalid = {}, {}
        for kv in items:
            self._classify(kv.key, kv.value, invalid_before.get(kv.key))
        self._revision = revision
        for key in sorted(before - set(self._valid)):
            log.info("participant_removed", key=key)
        for key in sorted(set(self._valid) - before):
            log.info("participant_added", key=key)

    def _apply(self, event: WatchEvent) -> None:
        self._revision = max(self._revision, event.mod_revision)
        if event.kind == "delete":
            self._invalid.pop(event.key, None)
            if self._valid.pop(event.key, None) is not None:
                log.info("participant_removed", key=event.key)
            return
        known = self._valid.pop(event.key, None) is not None
        previous_reason = self._invalid.pop(event.key, None)
        if self._classify(event.key, event.value, previous_reason) and not known:
            log.info("participant_added", key=event.key)

    def _classify(self, key: str, value: bytes, previous_reason: str | None) -> bool:
        """Record the registration as valid or invalid; warn once per key and reason."""
        result = check_registration(key, value)
        if isinstance(result, str):
            self._invalid[key] = result
            if previous_reason != result:
                log.warning("invalid_registration", key=key, reason=result)
            return False
        self._valid[key] = result
        return True

    async def _publish(self) -> None:
        self._snapshot = ParticipantSnapshot(
            MappingProxyType(dict(self._valid)), MappingProxyType(dict(self._invalid)), self._revision
        )
        try:
            result = self._on_change(self._snapshot)
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            log.exception("on_change_failed", prefix=self._prefix, revision=self._revision, error=repr(e))
        self._ready.set()
