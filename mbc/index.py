"""The vector index behind a small interface, so the FAISS index type can change freely.

Vectors are L2-normalised, so inner product is cosine similarity. Ids are int64 chosen by
the caller; `search` can leave out a contiguous id range (the asking bot's own phrases).
"""

from __future__ import annotations

from typing import Protocol

import faiss
import numpy as np


class VectorIndex(Protocol):
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; id -1 marks an empty slot.

        `exclude` is a half-open id range [start, end) that must not be returned.
        """
        ...

    def __len__(self) -> int: ...


class FlatIndex:
    """Exact inner-product search (faiss IndexFlatIP) with caller-chosen ids."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))

    def search(
        self, queries: np.ndarray, k: int, exclude: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, len(self)))
        params = None
        if exclude is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorNot(faiss.IDSelectorRange(*exclude)))
        if len(self) == 0:
            n = queries.shape[0]
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        return self._index.search(queries, k, params=params)

    def __len__(self) -> int:
        return int(self._index.ntotal)
