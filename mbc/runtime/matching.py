"""From training phrases to ranked intents: the matching logic shared by bots and the router.

An `IntentCatalog` is a searchable set of (bot, intent, phrase) entries. It is built aside and
swapped in whole, so lookups never see a half-updated index; only a large group's catalog is
changed in place (`replace_bots`), bot by bot. Each bot's phrases get a contiguous id range, which
lets a search leave out the asking bot inside FAISS itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mbc.runtime.config import RatingThresholds
from mbc.runtime.index import VectorIndex, build_index
from mbc.v1 import common_pb2


@dataclass(frozen=True)
class IntentPhrases:
    """The training phrases of one intent of one bot."""

    bot_id: str
    intent: str
    phrases: tuple[str, ...]


@dataclass(frozen=True)
class ScoredIntent:
    bot_id: str
    intent: str
    score: float
    rating: common_pb2.Rating
    matched_phrase: str


class IntentCatalog:
    """Searchable training phrases of a set of bots."""

    def __init__(self, entries: Sequence[IntentPhrases], vectors: np.ndarray, dim: int) -> None:
        """`vectors` has one row per phrase of `phrases_of(entries)`, in that order."""
        self._phrases: list[str] = []
        """By row (the index's id): the phrase; with `_intent_of_row`, its (bot, intent) in `_intents`.
        (A tuple per row cost 64 MB more at a million phrases.)"""
        self._intents: list[tuple[str, str]] = []
        self._intent_of_row = np.zeros(0, np.int32)
        self._bot_ranges = self._append(_sorted(entries))
        if len(vectors) != len(self._phrases):
            raise ValueError(f"{len(vectors)} vectors for {len(self._phrases)} phrases")
        self.dim = dim
        # Exact search for groups of the usual size, approximate for very large ones (mbc/runtime/index.py).
        self._index: VectorIndex = build_index(dim, np.arange(len(self._phrases), dtype=np.int64), vectors)
        self.bots = frozenset(self._bot_ranges)

    def _append(self, entries: list[IntentPhrases]) -> dict[str, tuple[int, int]]:
        """Rows for `entries` (sorted) after every row so far: the id range of each of their bots."""
        ranges: dict[str, tuple[int, int]] = {}
        rows = []
        for entry in entries:
            start = ranges.get(entry.bot_id, (len(self._phrases), 0))[0]
            self._phrases.extend(entry.phrases)
            rows.append(np.full(len(entry.phrases), len(self._intents), np.int32))
            self._intents.append((entry.bot_id, entry.intent))
            ranges[entry.bot_id] = (start, len(self._phrases))
        self._intent_of_row = np.concatenate([self._intent_of_row, *rows])
        return ranges

    @staticmethod
    def phrases_of(entries: Iterable[IntentPhrases]) -> list[str]:
        """All phrases, in the order the constructor expects their vectors."""
        return [phrase for entry in _sorted(entries) for phrase in entry.phrases]

    def __len__(self) -> int:
        return len(self._index)

    def replace_bots(self, bots: set[str], entries: Sequence[IntentPhrases], vectors: np.ndarray) -> None:
        """Replace every phrase of `bots` by the phrases of `entries` (theirs; a bot without entries
        leaves), in place, searches going on: the new phrases get ids after every id so far (one
        contiguous range per bot), are added, and the old ones are removed. Not thread-safe
        against another writer. `vectors`: a row per phrase of `phrases_of(entries)`."""
        entries = _sorted(entries)
        if len(vectors) != sum(len(e.phrases) for e in entries):
            raise ValueError(f"{len(vectors)} vectors for {sum(len(e.phrases) for e in entries)} phrases")
        if any(e.bot_id not in bots for e in entries):
            raise ValueError("entries of a bot that is not replaced")
        old = [self._bot_ranges[b] for b in bots if b in self._bot_ranges]
        first = len(self._phrases)
        kept = {b: r for b, r in self._bot_ranges.items() if b not in bots}
        new = self._append(entries)
        if len(vectors):
            self._index.add(np.arange(first, len(self._phrases), dtype=np.int64), vectors)
        self._bot_ranges = {**kept, **new}
        self.bots = frozenset(self._bot_ranges)
        if old:
            self._index.remove(np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in old]))

    def live_phrases(self) -> list[str]:
        """The phrases a search can return, bot by bot."""
        return [phrase for lo, hi in sorted(self._bot_ranges.values()) for phrase in self._phrases[lo:hi]]

    @property
    def drifted(self) -> bool:
        """The index would be better built anew (an approximate index after many changes)."""
        return self._index.drifted

    def search(self, queries: np.ndarray, k: int, exclude_bot: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest phrases of each query row: (similarities, phrase rows), row -1 for none."""
        if not self._phrases:
            n = len(queries)
            return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        exclude = self._bot_ranges.get(exclude_bot) if exclude_bot else None
        return self._index.search(np.asarray(queries, np.float32).reshape(-1, self.dim), k, exclude=exclude)

    def phrase(self, row: int) -> str:
        return self._phrases[row] if row >= 0 else ""

    def rank(
        self,
        query: np.ndarray,
        ratings: RatingThresholds,
        neighbours: int,
        limit: int,
        exclude_bot: str | None = None,
    ) -> list[ScoredIntent]:
        """Best intents for one query vector, best first, at most `limit`.

        The `neighbours` nearest phrases are aggregated per (bot, intent) by their best score.
        """
        if not self._phrases or limit <= 0:
            return []
        exclude = self._bot_ranges.get(exclude_bot) if exclude_bot else None
        scores, ids = self._index.search(query.reshape(1, -1), neighbours, exclude=exclude)
        best: dict[tuple[str, str], tuple[float, str]] = {}
        for score, idx in zip(scores[0], ids[0]):
            if idx < 0:
                continue
            key = self._intents[self._intent_of_row[idx]]
            if key not in best:
                best[key] = (float(score), self._phrases[idx])
        ranked = sorted(best.items(), key=lambda item: -item[1][0])[:limit]
        return [ScoredIntent(bot_id, intent, score, ratings.rate(score), phrase) for (bot_id, intent), (score, phrase) in ranked]


def _sorted(entries: Iterable[IntentPhrases]) -> list[IntentPhrases]:
    return sorted(entries, key=lambda e: (e.bot_id, e.intent))
