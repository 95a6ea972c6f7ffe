"""Intent catalogs with the real model: ranking, ratings, leaving the asking bot out."""

import numpy as np
import pytest

from mbc.runtime.config import RatingThresholds
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import common_pb2

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

INTENTS = [
    IntentPhrases("cards", "lost_card", ("I lost my credit card", "my card was stolen", "freeze my card")),
    IntentPhrases("cards", "activate_card", ("activate my new card", "how do I turn on my new card")),
    IntentPhrases("travel", "book_flight", ("book a flight to Rome", "I need a plane ticket")),
]


@pytest.fixture(scope="module")
def catalog(encoder):
    return IntentCatalog(INTENTS, encoder.encode(IntentCatalog.phrases_of(INTENTS)), encoder.dim)


def test_best_intent_first(catalog, encoder):
    ranked = catalog.rank(encoder.encode(["somebody stole my card"])[0], RatingThresholds(), neighbours=10, limit=3)
    assert [(r.bot_id, r.intent) for r in ranked][:1] == [("cards", "lost_card")]
    assert ranked[0].matched_phrase == "my card was stolen"
    assert ranked[0].score > ranked[1].score
    assert len({(r.bot_id, r.intent) for r in ranked}) == len(ranked)


def test_asking_bot_is_left_out(catalog, encoder):
    ranked = catalog.rank(encoder.encode(["somebody stole my card"])[0], RatingThresholds(), 10, 3, exclude_bot="cards")
    assert [r.bot_id for r in ranked] == ["travel"]


@pytest.mark.unit
def test_ratings_follow_thresholds():
    t = RatingThresholds(very_good=0.9, good=0.7, fair_plus=0.6, fair=0.5)
    assert [t.rate(s) for s in (0.95, 0.7, 0.65, 0.5, 0.1)] == [
        common_pb2.RATING_VERY_GOOD,
        common_pb2.RATING_GOOD,
        common_pb2.RATING_FAIR_PLUS,
        common_pb2.RATING_FAIR,
        common_pb2.RATING_POOR,
    ]
    with pytest.raises(ValueError):
        RatingThresholds(very_good=0.5, good=0.7)


def test_vectors_must_match_phrases(encoder):
    with pytest.raises(ValueError, match="vectors for"):
        IntentCatalog(INTENTS, np.zeros((2, encoder.dim), np.float32), encoder.dim)


def test_unchanged_phrases_are_not_embedded_again(encoder):
    phrases = ["a phrase only this test uses", "and a second one"]
    first = encoder.encode_phrases(phrases)
    cached = encoder.cached_phrases
    again = encoder.encode_phrases(list(reversed(phrases)))
    assert encoder.cached_phrases == cached
    np.testing.assert_array_equal(first[::-1], again)
