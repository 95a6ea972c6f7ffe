"""Phrase embeddings persisted on disk, so a restarted router re-embeds only what changed.

`EmbeddingStore` is one SQLite file (`embeddings.sqlite3` in the configured directory) mapping
(model id, text) to a float32 vector. SQLite gives atomic writes (a transaction per batch: a
crash leaves the previous content), safe sharing by several processes (WAL, busy timeout) and
lookups by key without loading the whole file. A file that is not a readable cache of ours
(corrupt, another format) is moved aside with a warning and a new one started; any later I/O
error only turns persistence off for this process, with a warning: the cache never stops a router.

`PhraseEmbeddings` is what the router calls: cached vectors from the store, the rest from the
encoder in chunks (with a progress bar on stderr when it is a terminal, and a log line at the
end), written back as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from mbc.runtime.logs import get_logger
from mbc.runtime.progress import progress_bar
from router.peers import PeerError, Peers

log = get_logger(__name__)

FILE_NAME = "embeddings.sqlite3"
SCHEMA = "mbc-embeddings-2"
DISABLED = "off"
"""`RouterConfig.embedding_cache_dir` value that turns persistence off."""
_LOOKUP_CHUNK = 2000


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mbc" / "embeddings"


def _key(model_id: str, text: str) -> bytes:
    return hashlib.blake2b(f"{model_id}\0{text}".encode(), digest_size=16).digest()


class EmbeddingStore:
    """Vectors by (model id, text) in one SQLite file; thread-safe."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            log.warning("embedding_cache_unreadable", path=str(self.path), error=str(e), action="moved aside, starting afresh")
            self._close()
            self._move_aside()
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as e2:
                self._disable(e2)
        except OSError as e:
            self._disable(e)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            # A rowid table (rows in write order, a small key index): a restart reads it sequentially.
            db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, dim INTEGER NOT NULL, data BLOB NOT NULL)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None or row[0] != SCHEMA:
                raise sqlite3.DatabaseError(f"schema {row[0] if row else None!r}, expected {SCHEMA!r}")
            check = db.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{self.path}{suffix}")
            if path.exists():
                os.replace(path, Path(f"{self.path}{suffix}.corrupt"))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _disable(self, error: BaseException) -> None:
        log.warning("embedding_cache_disabled", path=str(self.path), error=str(error))
        self._close()

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def read(
        self, model_id: str, texts: Sequence[str], dim: int, progress: Callable[[int], object] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, found): a row per text (distinct texts), its cached vector where `found` (one of
        this dimension). `progress(n)` is called as they come, n vectors at a time.

        Rows are copied into one matrix as they are read: a vector object per text (a dict of a
        million arrays over their own buffers) left the router 1.5 GB of freed but fragmented heap
        at 1M phrases."""
        rows = {_key(model_id, t): i for i, t in enumerate(texts)}
        vectors = np.zeros((len(texts), dim), np.float32)
        found = np.zeros(len(texts), bool)
        items = list(rows)
        with self._lock:
            if self._db is None:
                return vectors, found
            try:
                stored = self._db.execute("SELECT max(rowid) FROM vectors").fetchone()[0] or 0
                batches: Iterable[sqlite3.Cursor]
                if len(items) * 4 >= stored:  # asking for much of the file: one sequential read beats lookups
                    batches = [self._db.execute("SELECT key, dim, data FROM vectors")]
                else:
                    batches = (
                        self._db.execute(f"SELECT key, dim, data FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                        for chunk in (items[i : i + _LOOKUP_CHUNK] for i in range(0, len(items), _LOOKUP_CHUNK))
                    )
                count = 0
                for batch in batches:
                    for key, row_dim, data in batch:
                        row = rows.get(key)
                        if row is not None and row_dim == dim and len(data) == 4 * dim:
                            vectors[row] = np.frombuffer(data, np.float32)
                            found[row] = True
                            count += 1
                            if progress is not None and count % _LOOKUP_CHUNK == 0:
                                progress(_LOOKUP_CHUNK)
            except sqlite3.Error as e:
                self._disable(e)
        return vectors, found

    def put_many(self, model_id: str, texts: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        rows = [(_key(model_id, t), vectors.shape[1], v.tobytes()) for t, v in zip(texts, vectors)]
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self._disable(e)

    def __len__(self) -> int:
        with self._lock:
            if self._db is None:
                return 0
            return int(self._db.execute("SELECT count(*) FROM vectors").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._close()


def open_store(setting: str) -> EmbeddingStore | None:
    """The store a `RouterConfig.embedding_cache_dir` setting names: "" the default directory, "off" none."""
    if setting == DISABLED:
        return None
    return EmbeddingStore(setting or default_cache_dir())


class PhraseEmbeddings:
    """Phrase vectors for the router: from the store when cached, else from the replica that owns
    each phrase (router/peers.py: its peer, or this router's encoder).

    A phrase being embedded for one caller is not embedded again for another (a peer asking for
    the phrases this router is embedding itself): the second waits for the first.
    `encoded` counts the phrases that needed this router's model since creation, `fetched` those
    a peer embedded."""

    CHUNK = 256
    """Phrases per encoder call (and per progress step, and per write to the store). A call holds
    the encoder thread that Matches and the other groups' builds are encoded on: small enough that
    they wait little behind a large group's phrases, large enough to keep the engine's batches full."""

    def __init__(self, encoder, store: EmbeddingStore | None, peers: Peers | None = None) -> None:
        self.encoder = encoder
        self.store = store
        self.peers = peers
        """Set when replicas share work; None embeds everything here."""
        self.encoded = 0
        self.fetched = 0
        self._pending: dict[str, asyncio.Future[np.ndarray]] = {}

    async def embed(self, phrases: Sequence[str], local_only: bool = False) -> np.ndarray:
        """One row per phrase, in order. `local_only`: never ask a peer (a peer's request)."""
        dim = self.encoder.dim
        unique = list(dict.fromkeys(phrases))
        started = time.perf_counter()
        vectors, found = np.zeros((len(unique), dim), np.float32), np.zeros(len(unique), bool)
        if self.store is not None and unique:
            with progress_bar(len(unique), "reading cached phrase vectors") as bar:
                vectors, found = await asyncio.to_thread(self.store.read, self.encoder.model_id, unique, dim, bar.update)
                bar.update(len(unique) - bar.n)
        missing = np.flatnonzero(~found)
        if len(missing):  # the encoder's own phrase cache (a router without a store, or vectors a peer sent)
            recalled = np.zeros((len(missing), dim), np.float32)
            known = self.encoder.recall_phrases([unique[i] for i in missing], recalled)
            vectors[missing[known]] = recalled[known]
            if self.store is not None and known.any():
                recalled_texts = [unique[i] for i in missing[known]]
                await asyncio.to_thread(self.store.put_many, self.encoder.model_id, recalled_texts, recalled[known])
            missing = missing[~known]
        if len(missing):
            await self._fill(unique, missing, vectors, local_only)
        if len(unique) >= self.CHUNK:
            log.info(
                "phrases_embedded",
                phrases=len(unique),
                from_cache=len(unique) - len(missing),
                embedded=len(missing),
                seconds=round(time.perf_counter() - started, 3),
            )
        if len(unique) == len(phrases):
            return vectors
        row = {phrase: i for i, phrase in enumerate(unique)}
        return vectors[[row[phrase] for phrase in phrases]]

    async def _fill(self, texts: list[str], rows: np.ndarray, vectors: np.ndarray, local_only: bool) -> None:
        """`vectors[rows]` for `texts[rows]`: the phrases another call is embedding are waited for,
        the others embedded by their owners, side by side, and stored."""
        loop = asyncio.get_running_loop()
        waits: list[tuple[int, asyncio.Future[np.ndarray]]] = []
        by_owner: dict[str | None, list[int]] = {}
        for i in rows.tolist():
            future = self._pending.get(texts[i])
            if future is None:
                self._pending[texts[i]] = loop.create_future()
                owner = None if local_only or self.peers is None else self.peers.owner(texts[i])
                by_owner.setdefault(owner, []).append(i)
            else:
                waits.append((i, future))
        mine = [texts[i] for owned in by_owner.values() for i in owned]
        try:
            await asyncio.gather(*(self._embed_owned(owner, texts, owned, vectors) for owner, owned in by_owner.items()))
        except BaseException as e:
            for text in mine:
                future = self._pending.pop(text, None)
                if future is not None and not future.done():
                    future.set_exception(e)
                    future.exception()  # retrieved: a caller that waited on it gets it, no warning otherwise
            raise
        for i, future in waits:
            vectors[i] = await asyncio.shield(future)

    async def _embed_owned(self, owner: str | None, texts: list[str], rows: list[int], vectors: np.ndarray) -> None:
        if owner is not None and self.peers is not None:
            said = [texts[i] for i in rows]
            try:
                vectors[rows] = await self.peers.embed(owner, said, self.encoder.dim)
            except PeerError as e:
                log.warning("peer_embedding_failed", peer=owner, phrases=len(rows), error=str(e), action="embedding here")
            else:
                self.fetched += len(rows)
                self.encoder.remember_phrases(said, vectors[rows])
                await self._done(said, vectors[rows])
                return
        with progress_bar(len(rows), "embedding phrases") as bar:
            for start in range(0, len(rows), self.CHUNK):
                chunk = rows[start : start + self.CHUNK]
                said = [texts[i] for i in chunk]
                vectors[chunk] = await self.encoder.aencode_phrases(said)
                self.encoded += len(chunk)
                await self._done(said, vectors[chunk])
                bar.update(len(chunk))

    async def _done(self, texts: list[str], vectors: np.ndarray) -> None:
        """Stores `vectors` and hands them to the calls waiting for them."""
        if self.store is not None:
            await asyncio.to_thread(self.store.put_many, self.encoder.model_id, texts, vectors)
        for text, vector in zip(texts, vectors):
            future = self._pending.pop(text, None)
            if future is not None and not future.done():
                future.set_result(vector)
