"""The routers' labelled calibration set, kept in etcd so that every router replica uses the same.

Layout (keys in discovery/keys.py): the set's text (JSON Lines, router/calibration.py) is cut at
line ends into chunks of at most `CHUNK_BYTES` under `/mbc/v1/calibration/sets/<digest>/<n>`, each
a request well under etcd's 1.5 MiB limit; then `/mbc/v1/calibration/current` names the digest and
the chunk count. Readers watch `current` alone: a set is switched in one write, and a reader never
sees half of one. The chunks of the set replaced are deleted after the switch (a reader that was
reading them reads `current` again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from discovery.etcd_client import EtcdClient
from discovery.following import EtcdFollower
from discovery.keys import CALIBRATION_CURRENT, calibration_chunk_prefix

CHUNK_BYTES = 1_000_000
"""Bytes of the set per key: one put stays well under etcd's default 1.5 MiB request limit."""
MAX_SET_BYTES = 64 * CHUNK_BYTES
"""A larger set is refused when written: every router reads the whole set on every change."""


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


class CalibrationWatcher(EtcdFollower["StoredCalibration | None"]):
    """Calls `on_change(set or None)` with the set in etcd: once read first, then on every change
    of its digest (discovery/following.py)."""

    def __init__(self, client: EtcdClient, on_change: Callable[[StoredCalibration | None], Awaitable[None] | None]) -> None:
        super().__init__(
            client,
            "calibration",
            CALIBRATION_CURRENT,
            read_calibration,
            on_change,
            lambda stored: stored.digest if stored is not None else None,
        )
