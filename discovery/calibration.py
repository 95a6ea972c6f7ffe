"""The routers' labelled calibration set, kept in etcd so that every router replica uses the same.

Layout (keys in discovery/keys.py): the set's text (JSON Lines, router/calibration.py) is cut at
line ends into chunks of at most `CHUNK_BYTES` under `/mbc/v1/calibration/sets/<digest>/<n>`, each
a request well under etcd's 1.5 MiB limit; then `/mbc/v1/calibration/current` names the digest and
the chunk count. Readers watch `current` alone: a set is switched in one write, and a reader never
sees half of one. The chunks of the set replaced are deleted after the switch (a reader that was
reading them reads `current` again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from discovery.errors import EtcdError, EtcdUnavailable, WatchCompacted
from discovery.etcd_client import EtcdClient
from discovery.keys import CALIBRATION_CURRENT, calibration_chunk_prefix
from mbc.runtime.logs import get_logger

log = get_logger(__name__)

CHUNK_BYTES = 1_000_000
"""Bytes of the set per key: one put stays well under etcd's default 1.5 MiB request limit."""
MAX_SET_BYTES = 64 * CHUNK_BYTES
"""A larger set is refused when written: every router reads the whole set on every change."""
_RETRY_FIRST, _RETRY_CAP = 0.2, 2.0


class CalibrationTooLarge(ValueError):
    pass


@dataclass(frozen=True)
class StoredCalibration:
    """The set held in etcd: its text, digest, and the revision of the `current` key."""

    text: str
    digest: str
    mod_revision: int


def split_chunks(data: bytes, limit: int = CHUNK_BYTES) -> list[bytes]:
    """`data` cut after line ends into pieces of at most `limit` bytes; CalibrationTooLarge for a
    line longer than that, or a set past `MAX_SET_BYTES`."""
    if len(data) > MAX_SET_BYTES:
        raise CalibrationTooLarge(
            f"the calibration set has {len(data):,} bytes; etcd holds at most {MAX_SET_BYTES:,} (keep fewer utterances)"
        )
    chunks: list[bytes] = []
    current = b""
    for line in data.splitlines(keepends=True):
        if len(line) > limit:
            raise CalibrationTooLarge(f"a line of the calibration set has {len(line):,} bytes; at most {limit:,}")
        if len(current) + len(line) > limit:
            chunks.append(current)
            current = b""
        current += line
    if current or not chunks:
        chunks.append(current)
    return chunks


async def write_calibration(client: EtcdClient, text: str) -> str:
    """Store `text` as the mesh's calibration set (every router replica switches to it); returns its digest."""
    data = text.encode()
    chunks = split_chunks(data)
    digest = hashlib.sha256(data).hexdigest()[:24]
    before = await client.get(CALIBRATION_CURRENT)
    prefix = calibration_chunk_prefix(digest)
    for n, chunk in enumerate(chunks):
        await client.put(f"{prefix}{n:06d}", chunk)
    await client.put(CALIBRATION_CURRENT, json.dumps({"digest": digest, "chunks": len(chunks), "bytes": len(data)}).encode())
    old = _digest_of(before.value) if before is not None else None
    if old and old != digest:
        await client.delete_prefix(calibration_chunk_prefix(old))
    return digest


def _digest_of(value: bytes) -> str | None:
    try:
        record = json.loads(value)
        return str(record["digest"])
    except (ValueError, KeyError, TypeError):
        return None


async def read_calibration(client: EtcdClient) -> StoredCalibration | None:
    """The set in etcd, or None when there is none; EtcdError (and ValueError for a set that is
    not whole: being replaced, or written by something else) when it cannot be read."""
    current = await client.get(CALIBRATION_CURRENT)
    if current is None:
        return None
    try:
        record = json.loads(current.value)
        digest, count = str(record["digest"]), int(record["chunks"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{CALIBRATION_CURRENT} is not a calibration record: {e}") from e
    items, _ = await client.get_prefix(calibration_chunk_prefix(digest))
    if len(items) != count:
        raise ValueError(f"calibration set {digest}: {len(items)} chunks of {count} found")
    data = b"".join(kv.value for kv in sorted(items, key=lambda kv: kv.key))
    if hashlib.sha256(data).hexdigest()[:24] != digest:
        raise ValueError(f"calibration set {digest}: its chunks do not match the digest")
    return StoredCalibration(data.decode(), digest, current.mod_revision)


class CalibrationWatcher:
    """Calls `on_change(set or None)` with the set in etcd: once read first, then on every change.
    On errors it backs off and reads again; it stops only when stop() is called."""

    def __init__(self, client: EtcdClient, on_change: Callable[[StoredCalibration | None], Awaitable[None] | None]) -> None:
        self._client = client
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._failures = 0
        self._digest: str | None = ""

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="calibration-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def wait_first(self, timeout: float | None = None) -> None:
        """Until the set in etcd (or its absence) has been delivered once; TimeoutError after `timeout`."""
        await asyncio.wait_for(self._first.wait(), timeout)

    async def _run(self) -> None:
        while True:
            try:
                await self._read_and_watch()
            except (EtcdError, ValueError) as e:
                level = log.warning if self._failures == 0 else log.debug
                level("calibration_watch_interrupted", error=str(e), compacted=isinstance(e, WatchCompacted))
            except Exception as e:
                log.exception("calibration_watcher_failed", error=repr(e))
            self._failures += 1
            await asyncio.sleep(min(_RETRY_CAP, _RETRY_FIRST * 2 ** (self._failures - 1)))

    async def _read_and_watch(self) -> None:
        _, revision = await self._client.get_prefixes([CALIBRATION_CURRENT])
        await self._deliver()
        self._failures = 0
        events = self._client.watch_prefix(CALIBRATION_CURRENT, revision + 1)
        async with contextlib.aclosing(events):
            async for _ in events:
                await self._deliver()
        raise EtcdUnavailable("the calibration watch ended")

    async def _deliver(self) -> None:
        stored = await read_calibration(self._client)
        digest = stored.digest if stored is not None else None
        if digest != self._digest:
            self._digest = digest
            try:
                result = self._on_change(stored)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                log.exception("on_change_failed", what="calibration", error=repr(e))
        self._first.set()
