"""The vector index behind a small interface, so the FAISS index type can change freely.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are int64 chosen by
the caller; `search` can leave out a contiguous id range (the asking bot's own phrases).

Two implementations, picked by size (`build_index`):

- `FlatIndex`: exact search: a shortlist from an int8 copy re-ranked exactly (from 2,048 vectors),
  or a BLAS matrix product per batch of queries. Below `EXACT_MAX_VECTORS` it is also the faster one.
- `IVFIndex`: approximate, for large groups. An inverted file with 4-bit PQ fast-scan codes
  (48 bytes a vector at 384-d) finds a short list, re-ranked with a float16 copy of the vectors
  (768 bytes a vector): no float32 copy is held, so 1M × 384-d takes 0.87 GB (measured) instead of 1.5.

Threshold, measured on 2 shared cores (load average 8), one query at a time, k = 100, CLINC150
utterances among realistic vectors (see mbc/bench/index.py), before the int8 shortlist: exact search p50 1.3 ms at 10k, 5.4
ms at 25k, 10.9 ms at 50k, 19.3 ms at 100k (0.25 and 5.2 ms at 10k and 100k on a quiet machine);
the IVF index 0.7-0.9 ms from 10k to 100k. But its top-1 agrees with exact search ~99.5% of the
time, not always: exact search stays up to 20,000 vectors (under ~1 ms on a quiet machine), which
keeps the usual groups (the 10-bot CLINC150 mesh has 15,000 phrases) exactly as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import faiss
import numpy as np

from mbc.runtime import int8_scan
from mbc.runtime.progress import progress_bar

EXACT_MAX_VECTORS = 20_000
"""`build_index` uses exact search below this many vectors, the IVF index from there on."""


class VectorIndex(Protocol):
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, best first; id -1 marks an empty slot.

        `exclude` is a half-open id range [start, end) that must not be returned.
        """
        ...

    @property
    def drifted(self) -> bool:
        """After many changes, the index would be better built anew."""
        ...

    def __len__(self) -> int: ...


BUILD_CHUNK = 65_536
"""Vectors per add while `build_index` fills an IVF index (a progress step)."""


def build_index(dim: int, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    """An index holding `vectors`: exact below `EXACT_MAX_VECTORS`, else IVF trained on them
    (with a progress bar: 15 s at 1M vectors on 2 cores)."""
    if len(vectors) < EXACT_MAX_VECTORS:
        index = FlatIndex(dim)
        if len(vectors):
            index.add(ids, vectors)
        return index
    with progress_bar(len(vectors), "indexing phrases") as bar:
        ivf = IVFIndex(dim, training=vectors)
        start = 0
        while start < len(vectors):
            # A short tail joins the last chunk: every chunk is a bulk add, straight into the lists.
            stop = len(vectors) if len(vectors) - start < 2 * BUILD_CHUNK else start + BUILD_CHUNK
            ivf.add(ids[start:stop], vectors[start:stop])
            bar.update(stop - start)
            start = stop
    return ivf


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: about sqrt(n), a power of two. Probing an eighth of them keeps
    top-1 agreement with exact search ≥ 0.99 on CLINC150 utterances among 1M realistic vectors."""
    return int(min(4096, max(64, 2 ** round(np.log2(max(1.0, np.sqrt(n)))))))


@contextmanager
def _one_thread() -> Iterator[None]:
    """FAISS on one OpenMP thread for this block (training and adding): on 2 shared, loaded cores,
    training for 100k vectors took 1.2 s on one thread and 43 s on two (spinning team)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _check(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"expected vectors of shape (n, {dim}), got {vectors.shape}")
    return vectors


def _excluding(exclude: tuple[int, int] | None) -> faiss.IDSelector | None:
    return faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude)) if exclude is not None else None


def _empty(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)


SHORTLIST_MIN_VECTORS = 2_048
"""From this many vectors, `FlatIndex` scores exactly only a shortlist from its int8 copy."""
SEARCH_CHUNK = 256
"""Queries `FlatIndex` searches at once: its scores are queries × vectors (and the shortlist's
rows queries × (k + margin) × dim), so a caller searching thousands at once (cross-fitting,
`mbc overlap`) gets them in pieces."""


class FlatIndex:
    """Exact inner-product search for groups of the usual size.

    From `SHORTLIST_MIN_VECTORS` vectors (and with onnxruntime, the onnx extra): each query's
    `k + SHORTLIST_MARGIN` best vectors by an int8 copy (`Int8Scan`, mbc/runtime/int8_scan.py),
    then their exact float32 scores, top-k of those: the exact top-k, as long as the int8 error
    (about 0.01 of cosine) never moves a true neighbour past the margin, which holds unless more
    than 48 vectors crowd within that error of the k-th (the same top-100 for 1,000 CLINC150
    utterances; near-duplicates so crowded have near-equal scores). The float32 BLAS
    product read the whole group for each micro-batch (23 MB for the 15,000 CLINC150 phrases) and
    a top-k over every vector followed; the int8 scan reads a quarter of that and does the top-k in
    the same pass. A query's shortlist does not depend on the other queries of its batch: a Match
    scores the same alone or batched. Figures: docs/performance.md ("Against the measured bound").

    Fewer vectors, or no onnxruntime: one BLAS matrix product per batch of queries. Why not
    faiss's IndexFlatIP: faiss 1.15 scans the vectors once per query (its BLAS path starts at
    128,000 query x vector pairs and is never taken with an excluded id range), so a micro-batch
    of 16 Matches cost 16 scans of the 15,000 CLINC150 phrases, 14 ms on one thread, against 2 ms
    for the product (measured, 2 cores).

    A search reads one immutable snapshot, so changes never block it; they copy the vectors,
    cheap at the sizes this index is used for."""

    SHORTLIST_MARGIN = 48
    """Candidates beyond k that the int8 scan keeps for the exact re-rank."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._snapshot: tuple[np.ndarray, np.ndarray, int8_scan.Int8Scan | None] = (
            np.zeros(0, np.int64),
            np.zeros((0, dim), np.float32),
            None,
        )
        """(ids, vectors by position, their int8 scan or None), replaced whole by add and remove."""
        self._writing = threading.Lock()

    @staticmethod
    def _with(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int8_scan.Int8Scan | None]:
        scan = int8_scan.Int8Scan(rows) if int8_scan.AVAILABLE and len(ids) >= SHORTLIST_MIN_VECTORS else None
        return ids, rows, scan

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = _check(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if not len(ids):
            return
        with self._writing:
            old_ids, old_rows, _ = self._snapshot
            self._snapshot = self._with(np.concatenate([old_ids, ids]), np.concatenate([old_rows, vectors]))

    def remove(self, ids: np.ndarray) -> None:
        with self._writing:
            old_ids, old_rows, _ = self._snapshot
            keep = ~np.isin(old_ids, np.asarray(ids, dtype=np.int64))
            if not keep.all():
                self._snapshot = self._with(old_ids[keep], old_rows[keep])

    def search(self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(queries) > SEARCH_CHUNK:
            parts = [self.search(queries[i : i + SEARCH_CHUNK], k, exclude) for i in range(0, len(queries), SEARCH_CHUNK)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        ids, rows, scan = self._snapshot
        n = len(ids)
        if n == 0:
            return _empty(queries.shape[0])
        k = max(1, min(k, n))
        excluded = (ids >= exclude[0]) & (ids < exclude[1]) if exclude is not None else None
        if scan is not None and k + self.SHORTLIST_MARGIN < n:
            columns = scan.shortlist(queries, k + self.SHORTLIST_MARGIN, excluded)
            scores = np.matmul(rows[columns], queries[:, :, None])[:, :, 0]
            if excluded is not None:
                scores[excluded[columns]] = -np.inf
        else:
            scores = queries @ rows.T
            if excluded is not None:
                scores[:, excluded] = -np.inf
            columns = np.broadcast_to(np.arange(n), scores.shape)
        if k < scores.shape[1]:
            part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k :]
            scores = np.take_along_axis(scores, part, axis=1)
            columns = np.take_along_axis(columns, part, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")
        top = np.take_along_axis(scores, order, axis=1)
        found = ids[np.take_along_axis(columns, order, axis=1)]
        found[np.isneginf(top)] = -1
        return top, found

    drifted = False
    """Exact search never drifts."""

    def __len__(self) -> int:
        return len(self._snapshot[0])


class _Float16Rows:
    """Float16 copies of the vectors by id, for the exact re-rank; slots are reused after removal.

    Rows live in fixed blocks, so growing never copies what is there. Ids index a dense array:
    memory follows the largest id (the catalog's ids are row numbers, 0..n-1)."""

    BLOCK = 1 << 16

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._blocks: list[np.ndarray] = []
        self._slot_of = np.full(0, -1, np.int64)
        self._free: list[np.ndarray] = []
        self._next = 0
        self.live = 0

    def _slots(self, n: int) -> np.ndarray:
        free = np.concatenate(self._free) if self._free else np.zeros(0, np.int64)
        take, rest = free[:n], free[n:]
        self._free = [rest] if len(rest) else []
        fresh = np.arange(self._next, self._next + n - len(take), dtype=np.int64)
        self._next += len(fresh)
        while self._next > len(self._blocks) * self.BLOCK:
            self._blocks.append(np.zeros((self.BLOCK, self.dim), np.float16))
        return np.concatenate([take, fresh])

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) and ids.min() < 0:
            raise ValueError("ids must not be negative")
        self.drop(ids)
        top = int(ids.max()) + 1 if len(ids) else 0
        if top > len(self._slot_of):
            grown = np.full(max(top, 2 * len(self._slot_of)), -1, np.int64)
            grown[: len(self._slot_of)] = self._slot_of
            self._slot_of = grown
        slots = self._slots(len(ids))
        for block in np.unique(slots // self.BLOCK):
            mine = slots // self.BLOCK == block
            self._blocks[block][slots[mine] % self.BLOCK] = vectors[mine]
        self._slot_of[ids] = slots
        self.live += len(ids)

    def drop(self, ids: np.ndarray) -> np.ndarray:
        """Forget these ids; returns those that were present."""
        ids = ids[ids < len(self._slot_of)]
        present = ids[self._slot_of[ids] >= 0]
        if len(present):
            self._free.append(self._slot_of[present].copy())
            self._slot_of[present] = -1
            self.live -= len(present)
        return present

    def known(self, ids: np.ndarray) -> np.ndarray:
        """Per id: is it held (ids of removed vectors still found in the coarse index are not)."""
        inside = (ids >= 0) & (ids < len(self._slot_of))
        out = np.zeros(len(ids), bool)
        out[inside] = self._slot_of[ids[inside]] >= 0
        return out

    def get(self, ids: np.ndarray) -> np.ndarray:
        slots = self._slot_of[ids]
        out = np.empty((len(ids), self.dim), np.float32)
        for block in np.unique(slots // self.BLOCK):
            mine = slots // self.BLOCK == block
            out[mine] = self._blocks[block][slots[mine] % self.BLOCK]
        return out


class _ReadWriteLock:
    """Searches share it, changes take it alone; a waiting change goes before new searches.

    FAISS searches may run side by side; only adding to the lists (and the re-rank rows) may not."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _FreshSegment:
    """Vectors added since the inverted lists were last filled, searched exactly. Rows are appended
    in place (the capacity doubles when full), so adding a participant copies its own rows, not
    the segment: at 2,000 fresh vectors a concatenation copied 3 MB under the write lock."""

    def __init__(self, dim: int) -> None:
        self._ids = np.zeros(0, np.int64)
        self._vectors = np.zeros((0, dim), np.float32)
        self._size = 0

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        end = self._size + len(ids)
        if end > len(self._ids):
            capacity = max(end, 2 * len(self._ids), 256)
            grown_ids = np.zeros(capacity, np.int64)
            grown = np.zeros((capacity, self._vectors.shape[1]), np.float32)
            grown_ids[: self._size], grown[: self._size] = self._ids[: self._size], self._vectors[: self._size]
            self._ids, self._vectors = grown_ids, grown
        self._ids[self._size : end], self._vectors[self._size : end] = ids, vectors
        self._size = end

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) held, as views: valid until the next change."""
        return self._ids[: self._size], self._vectors[: self._size]

    def drop_first(self, count: int) -> None:
        rest = self._size - count
        self._ids[:rest] = self._ids[count : self._size].copy()
        self._vectors[:rest] = self._vectors[count : self._size].copy()
        self._size = rest

    def __len__(self) -> int:
        return self._size


class IVFIndex:
    """Approximate inner-product search: IVF with 4-bit PQ fast-scan codes, exact float16 re-rank.

    Trained once, on the vectors given at construction (a sample of at most 40 per list); add and
    remove then cost only the vectors concerned, so replacing one participant's phrases does not
    rebuild anything. Removal is logical: the ids vanish from results at once, their entries stay
    in the inverted lists (faiss 1.15's remove_ids corrupts the packed codes of fast-scan lists,
    measured) and are skipped by the re-rank. `drifted` says when the lists no longer fit: 4× more
    or fewer vectors than `trained_for`, or as many stale entries as live ones (searches then scan
    twice what they need); the owner should then build a new index.

    Small adds (a participant's phrases) first go to a fresh segment searched exactly beside the
    lists, so they cost a search nothing: coding vectors into fast-scan lists is the slow part
    (~5 ms for 100 vectors) and a search cannot run while it happens. Once the fresh segment holds
    `FRESH_MAX` vectors it is folded into the lists, `ADD_SLICE` vectors per lock, so a search
    waits at most for one slice.

    Searches run side by side; an add or remove waits for them and holds new ones back briefly."""

    ADD_SLICE = 16
    FRESH_MAX = 8192
    """Vectors held in the exactly searched fresh segment before they are folded into the lists."""
    RERANK_FACTOR = 4
    """Candidates re-ranked exactly per result asked (at least 64)."""

    def __init__(self, dim: int, training: np.ndarray, nlist: int = 0, nprobe: int = 0, seed: int = 1234) -> None:
        training = _check(training, dim)
        n = len(training)
        self.dim = dim
        self.nlist = nlist or ivf_lists(n)
        self.nprobe = nprobe or max(8, self.nlist // 8)
        self.trained_for = self.nlist**2
        """The size the lists fit (about √n lists for n vectors), whatever the training sample."""
        quantizer = faiss.IndexFlatIP(dim)
        subquantizers = dim // 4 if dim % 4 == 0 else dim // 2 if dim % 2 == 0 else dim
        self._index = faiss.IndexIVFPQFastScan(quantizer, dim, self.nlist, subquantizers, 4, faiss.METRIC_INNER_PRODUCT)
        self._index.cp.niter = 10
        self._index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = training if n <= 40 * self.nlist else training[rng.choice(n, 40 * self.nlist, replace=False)]
        if len(sample) < self.nlist:
            raise ValueError(
                f"an IVF index of {self.nlist} lists needs at least {self.nlist} training vectors, got {len(sample)}"
            )
        with _one_thread():
            self._index.train(sample)
        self._quantizer = quantizer  # the IVF index does not own it
        self._rows = _Float16Rows(dim)
        self._fresh = _FreshSegment(dim)
        self._lock = _ReadWriteLock()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = _check(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        # A re-added id may still sit in the lists with its old code: harmless, the re-rank reads
        # the current vector and duplicates are merged.
        if len(ids) > 4096:  # a bulk load: straight into the lists, one call
            with self._lock.writing(), _one_thread():
                self._rows.put(ids, vectors)
                self._index.add_with_ids(vectors, ids)
            return
        with self._lock.writing():
            self._rows.put(ids, vectors)
            self._fresh.append(ids, vectors)
        if len(self._fresh) >= self.FRESH_MAX:
            self._fold_fresh()

    def _fold_fresh(self) -> None:
        """Moves the fresh segment into the lists, a slice per lock."""
        with self._lock.reading():
            ids, vectors = (a.copy() for a in self._fresh.view())
        for start in range(0, len(ids), self.ADD_SLICE):
            with self._lock.writing(), _one_thread():
                self._index.add_with_ids(vectors[start : start + self.ADD_SLICE], ids[start : start + self.ADD_SLICE])
        with self._lock.writing():  # what was added meanwhile stays fresh
            self._fresh.drop_first(len(ids))

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock.writing():
            self._rows.drop(ids)

    def _fresh_candidates(self, queries: np.ndarray, wide: int, exclude: tuple[int, int] | None) -> np.ndarray:
        """The `wide` best fresh ids per query, exactly (-1 where fewer are live). Scores every row
        in place and masks the removed and excluded ones: no copy of the segment per search."""
        ids, vectors = self._fresh.view()
        out = np.full((len(queries), min(wide, len(ids))), -1, np.int64)
        if not len(ids):
            return out
        scores = queries @ vectors.T
        dead = ~self._rows.known(ids)
        if exclude is not None:
            dead |= (ids >= exclude[0]) & (ids < exclude[1])
        scores[:, dead] = -np.inf
        top = out.shape[1]
        best = (
            np.argpartition(-scores, top - 1, axis=1)[:, :top]
            if top < len(ids)
            else np.broadcast_to(np.arange(len(ids)), scores.shape)
        )
        out[:] = ids[best]
        out[np.isneginf(np.take_along_axis(scores, best, axis=1))] = -1
        return out

    def search(self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        nq = len(queries)
        if len(self) == 0:
            return _empty(nq)
        k = max(1, min(k, len(self)))
        wide = max(64, self.RERANK_FACTOR * k)
        # Attributes, not constructor keywords: faiss's stubs omit the keyword __init__ (both set the same fields).
        params = faiss.SearchParametersIVF()
        params.sel = _excluding(exclude)
        params.nprobe = self.nprobe
        scores = np.full((nq, k), -np.inf, np.float32)
        out = np.full((nq, k), -1, np.int64)
        with self._lock.reading():
            _, candidates = self._index.search(queries, wide, params=params)
            if len(self._fresh):
                # Fresh scores are exact already: the k best are all the re-rank needs from there.
                candidates = np.concatenate([candidates, self._fresh_candidates(queries, k, exclude)], axis=1)
            for q in range(nq):
                ids = candidates[q]
                ids = np.unique(ids[self._rows.known(ids)])
                if not len(ids):
                    continue
                exact = self._rows.get(ids) @ queries[q]
                best = np.argsort(-exact, kind="stable")[:k]
                scores[q, : len(best)] = exact[best]
                out[q, : len(best)] = ids[best]
        return scores, out

    @property
    def drifted(self) -> bool:
        live = len(self)
        return not (self.trained_for / 4 <= live <= 4 * self.trained_for) or self.entries > 2 * live

    @property
    def entries(self) -> int:
        """Entries in the inverted lists and the fresh segment, stale ones included."""
        return int(self._index.ntotal) + len(self._fresh)

    def __len__(self) -> int:
        return self._rows.live
