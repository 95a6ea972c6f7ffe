"""A bot's own intents matched by words alone: what a bot without the model answers when no router does.

A message and a training phrase are compared after normalisation (case, punctuation, whitespace)
as sets of word unigrams and bigrams, by their Dice coefficient (2·|shared| / (|a| + |b|)): 1.0
for the same words in the same order, and a near phrase ("lost my debit card" for "I lost my
debit card") still scores high, while a message sharing a word or two ("my card") does not. Only
a score of at least `LEXICAL_THRESHOLD` counts as a match: below it the bot gives its fallback,
since without the router it cannot know another bot would do better. Pure Python, no model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from mbc.v1 import common_pb2

LEXICAL_THRESHOLD = 0.65
"""The least Dice score of unigrams and bigrams that counts as a match. Chosen so that a phrase
with one word dropped or changed still matches ("I lost my debit card": 0.88 without "I", 0.75
without "my", 0.67 with "credit" for "debit"), and a fragment of one does not ("my card" against
"my card was declined": 0.6; against "I lost my debit card": 0.33)."""

_NOT_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case, punctuation as spaces, whitespace collapsed: "  I lost MY card!" → "i lost my card"."""
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def features(text: str) -> frozenset[str]:
    """The word unigrams and bigrams of `text` (normalised)."""
    return _features(normalise(text))


def _features(normalised: str) -> frozenset[str]:
    words = normalised.split()
    return frozenset([*words, *(f"{a} {b}" for a, b in zip(words, words[1:]))])


def dice(a: frozenset[str], b: frozenset[str]) -> float:
    return 2 * len(a & b) / (len(a) + len(b)) if a or b else 0.0


class LexicalIntents:
    """The intents of one bot, matched by words (see the module docstring).

    The phrases are indexed at the first message, not at start: a host of hundreds of bots that
    the router serves never pays for (nor keeps) indexes it does not use."""

    def __init__(self, intents: Iterable[tuple[str, Sequence[str]]], threshold: float = LEXICAL_THRESHOLD) -> None:
        """`intents`: (name, training phrases) of each intent of the bot."""
        self.threshold = threshold
        self._intents = tuple(intents)
        self._exact: dict[str, str] | None = None
        self._phrases: list[tuple[str, frozenset[str]]] = []

    def _index(self) -> dict[str, str]:
        exact: dict[str, str] = {}
        for name, phrases in self._intents:
            for phrase in phrases:
                normalised = normalise(phrase)
                exact.setdefault(normalised, name)
                self._phrases.append((name, _features(normalised)))
        self._exact = exact
        return exact

    async def prepare(self) -> None:
        """Nothing to prepare: the phrases are indexed when first needed."""

    async def best(self, text: str) -> tuple[str, float, int]:
        """(intent, score, rating) of the best match of `text`; intent "" when none reaches the threshold.
        An exact match (after normalisation) is rated VERY_GOOD, any other match GOOD."""
        normalised = normalise(text)
        exact = (self._exact if self._exact is not None else self._index()).get(normalised)
        if exact is not None:
            return exact, 1.0, common_pb2.RATING_VERY_GOOD
        query = _features(normalised)
        intent, score = "", 0.0
        for name, phrase in self._phrases:
            s = dice(query, phrase)
            if s > score:
                intent, score = name, s
        if score >= self.threshold:
            return intent, score, common_pb2.RATING_GOOD
        return "", score, common_pb2.RATING_POOR

    def close(self) -> None:
        """Nothing to release."""
