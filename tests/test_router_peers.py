"""Router replicas sharing the work of becoming ready (router/peers.py): who owns a piece of work,
the heads as the replicas send them, and a phrase embedded once for concurrent callers. The
replicas themselves, started at once, are in tests/test_router_replicas.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import numpy as np
import pytest

from mbc.runtime.channels import ChannelPool
from router.decision import Heads, LexicalSvm
from router.embedding_store import PhraseEmbeddings
from router.model_cache import heads_from_bytes, heads_to_bytes
from router.peers import Peers, owner_of

pytestmark = pytest.mark.unit

REPLICAS = ("10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051")


def test_each_key_has_one_owner_and_the_keys_spread_over_the_replicas():
    keys = [f"phrase number {i}" for i in range(3000)]
    owners = Counter(owner_of(k, REPLICAS) for k in keys)
    assert set(owners) == set(REPLICAS)
    assert all(800 <= n <= 1200 for n in owners.values()), owners
    assert [owner_of(k, reversed(REPLICAS)) for k in keys[:200]] == [owner_of(k, REPLICAS) for k in keys[:200]]


def test_a_replica_leaving_moves_only_its_own_keys():
    keys = [f"group {i}" for i in range(2000)]
    before = {k: owner_of(k, REPLICAS) for k in keys}
    after = {k: owner_of(k, REPLICAS[:2]) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == REPLICAS[2] for k in moved)


async def test_peers_count_this_replica_even_before_its_record_is_listed():
    pool = ChannelPool()
    peers = Peers(REPLICAS[0], pool, "model")
    assert peers.owner("anything") is None  # alone: everything is its own
    peers.update(REPLICAS[1:])
    owned = [k for k in (f"k{i}" for i in range(300)) if peers.owner(k) is None]
    assert 60 <= len(owned) <= 140 and peers.others == REPLICAS[1:]
    await pool.close()


def test_heads_travel_as_bytes_and_come_back_equal():
    texts = ["lost my card", "card stolen", "open an account", "new savings account"]
    svm = LexicalSvm.fit(texts, np.array([0, 0, 1, 1]))
    char_svm = LexicalSvm.fit(texts, np.array([0, 0, 1, 1]), analyzer="char_wb")
    rng = np.random.default_rng(0)
    heads = Heads(
        [("cards", "lost"), ("accounts", "open")],
        rng.normal(size=(8, 2)).astype(np.float32),
        np.ones(2, np.float32),
        svm,
        0.25,
        {"method": "test"},
        char_svm,
    )
    back = heads_from_bytes(heads_to_bytes(heads))
    assert back is not None and back.classes == heads.classes and back.tau == 0.25 and back.calibration == {"method": "test"}
    assert np.array_equal(back.W, heads.W) and np.array_equal(back.b, heads.b)
    assert back.svm is not None and np.array_equal(back.svm.decision_function(texts), svm.decision_function(texts))
    assert back.char_svm is not None and back.char_svm.analyzer == "char_wb"
    assert np.array_equal(back.char_svm.decision_function(["lost my crad"]), char_svm.decision_function(["lost my crad"]))
    no_char = heads_from_bytes(heads_to_bytes(dataclasses.replace(heads, char_svm=None)))
    assert no_char is not None and no_char.char_svm is None
    with pytest.raises(ValueError, match="not a heads archive"):
        heads_from_bytes(b"not an archive")


class CountingEncoder:
    """What PhraseEmbeddings needs of an encoder, counting the phrases it is asked to embed."""

    dim = 4
    model_id = "counting"

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()

    async def aencode_phrases(self, phrases):
        await asyncio.sleep(0.05)  # long enough for the other callers to arrive meanwhile
        self.asked.update(phrases)
        return np.array([[len(p), 1.0, 0.0, float(i)] for i, p in enumerate(phrases)], np.float32)

    def remember_phrases(self, phrases, vectors) -> None:
        pass

    def recall_phrases(self, phrases, into):
        return np.zeros(len(phrases), bool)


async def test_a_phrase_is_embedded_once_for_concurrent_callers():
    encoder = CountingEncoder()
    embeddings = PhraseEmbeddings(encoder, None)
    phrases = [f"phrase {i}" for i in range(40)]
    results = await asyncio.gather(embeddings.embed(phrases), embeddings.embed(phrases[10:]), embeddings.embed(phrases[::-1]))
    assert set(encoder.asked.values()) == {1} and len(encoder.asked) == 40
    row = {p: v for p, v in zip(phrases, results[0])}
    assert all(np.array_equal(v, row[p]) for p, v in zip(phrases[::-1], results[2]))


async def test_an_unreachable_owner_means_the_work_is_done_here():
    encoder = CountingEncoder()
    pool = ChannelPool()
    peers = Peers("127.0.0.1:1", pool, encoder.model_id)
    peers.update(["127.0.0.1:9"])  # nothing listens there
    embeddings = PhraseEmbeddings(encoder, None, peers)
    phrases = [f"phrase {i}" for i in range(50)]
    try:
        vectors = await embeddings.embed(phrases)
    finally:
        await pool.close()
    assert len(encoder.asked) == 50 and embeddings.fetched == 0 and vectors.shape == (50, 4)
    assert peers.owner("any key at all") is None  # the unreachable replica owns nothing for a while
