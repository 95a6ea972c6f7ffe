"""The persisted phrase embeddings: a restarted router re-embeds nothing; a bad cache file costs nothing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mbc.runtime.config import RouterConfig
from mbc.v1 import participant_pb2
from router.core import RouterCore
from router.embedding_store import FILE_NAME, EmbeddingStore, PhraseEmbeddings, open_store

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

PHRASES = {
    "lost_card": ["I lost my debit card", "my credit card was stolen", "cannot find my card anywhere"],
    "balance": ["what is my balance", "how much money is in checking", "show my savings balance"],
}


def _snapshot() -> dict:
    p = participant_pb2.Participant(bot_id="cards", instance_id="i1", address="127.0.0.1:9", group="g", collaboration=True)
    for name, phrases in PHRASES.items():
        p.intents.add(name=name, phrases=phrases)
    return {"/mbc/v1/participants/g/cards/i1": p}


async def _start_router(encoder, cache_dir) -> RouterCore:
    core = RouterCore(RouterConfig(embedding_cache_dir=str(cache_dir)), encoder)
    core.submit(_snapshot(), 1)
    await asyncio.wait_for(core.wait_builds(1), 120)
    return core


async def test_a_restarted_router_embeds_nothing(encoder, tmp_path):
    first = await _start_router(encoder, tmp_path)
    # Every phrase is in the file, embedded now or recalled from the (session's) encoder.
    assert len(first.embeddings.store) == 6
    vectors = first.models["g"].vectors.copy()
    await first.close()

    second = await _start_router(encoder, tmp_path)
    try:
        assert second.embeddings.encoded == 0  # every vector came from the file
        np.testing.assert_array_equal(second.models["g"].vectors, vectors)
        result = await second.match("somebody stole my card", "", "g", 1, 0)
        assert result.candidates[0].match.intent == "lost_card"
    finally:
        await second.close()


async def test_a_corrupt_cache_file_is_moved_aside_and_rebuilt(encoder, tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"not a database " * 500)
    core = await _start_router(encoder, tmp_path)
    try:
        assert core.embeddings.store.enabled
        assert (tmp_path / f"{FILE_NAME}.corrupt").read_bytes().startswith(b"not a database")
    finally:
        await core.close()
    store = EmbeddingStore(tmp_path)
    assert len(store) == 6  # the new file holds what was embedded
    store.close()


async def test_other_model_or_dimension_is_a_miss(encoder, tmp_path):
    store = EmbeddingStore(tmp_path)
    texts = ["hello there", "good morning"]
    store.put_many(encoder.model_id, texts, np.ones((2, encoder.dim), np.float32))
    assert store.read(encoder.model_id, texts, encoder.dim)[1].all()
    assert not store.read("another-model", texts, encoder.dim)[1].any()
    assert not store.read(encoder.model_id, texts, encoder.dim + 1)[1].any()
    store.close()

    embeddings = PhraseEmbeddings(encoder, EmbeddingStore(tmp_path))
    vectors = await embeddings.embed(["good morning", "new phrase", "good morning"])
    assert embeddings.encoded == 1
    np.testing.assert_array_equal(vectors[0], np.ones(encoder.dim, np.float32))  # from the file
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert np.linalg.norm(vectors[1]) == pytest.approx(1.0, abs=1e-4)
    embeddings.store.close()


@pytest.mark.unit
def test_off_disables_persistence_and_empty_means_the_user_cache(tmp_path, monkeypatch):
    assert open_store("off") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    store = open_store("")
    assert store.path == tmp_path / "mbc" / "embeddings" / FILE_NAME and store.enabled
    store.close()


@pytest.mark.unit
def test_an_unwritable_directory_turns_persistence_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = EmbeddingStore(blocker / "sub")  # a directory cannot be made inside a file
    assert not store.enabled
    store.put_many("m", ["a"], np.ones((1, 4), np.float32))
    assert not store.read("m", ["a"], 4)[1].any()


async def test_a_restarted_router_trains_nothing_and_scores_the_same(encoder, tmp_path):
    first = await _start_router(encoder, tmp_path)
    trained = first.models["g"]
    before = await first.match("somebody stole my card", "", "g", 2, 0)
    await first.close()
    assert trained.times.lr_iterations > 0  # the first start trained the heads ...
    assert len(list((tmp_path / "models").glob("*.npz"))) == 1  # ... and kept them

    second = await _start_router(encoder, tmp_path)
    try:
        restored = second.models["g"]
        assert restored.times.lr_iterations == 0 and restored.times.svm == 0.0  # nothing trained
        assert restored.tau == trained.tau and restored.calibration == trained.calibration
        after = await second.match("somebody stole my card", "", "g", 2, 0)
        assert [(c.match.intent, c.match.confidence, c.match.rating) for c in after.candidates] == [
            (c.match.intent, c.match.confidence, c.match.rating) for c in before.candidates
        ]
    finally:
        await second.close()


async def test_changed_phrases_or_an_unreadable_heads_file_train_again(encoder, tmp_path):
    core = await _start_router(encoder, tmp_path)
    await core.close()
    (saved,) = (tmp_path / "models").glob("*.npz")
    saved.write_bytes(b"not an npz file")
    core = await _start_router(encoder, tmp_path)
    try:
        assert core.models["g"].times.lr_iterations > 0  # trained again, the bad file replaced
        assert np.load(saved, allow_pickle=False)["W"].shape == core.models["g"].W.shape
        # Another phrase while running: trained from scratch (never warm from the previous model,
        # which would make the heads depend on the router's history) and kept.
        snapshot = _snapshot()
        snapshot["/mbc/v1/participants/g/cards/i1"].intents[0].phrases.append("my card is gone")
        core.submit(snapshot, 2)
        await asyncio.wait_for(core.wait_builds(2), 120)
        assert core.models["g"].times.lr_iterations > 0 and not core.models["g"].times.warm_started
        changed = core.models["g"]
        assert len(list((tmp_path / "models").glob("*.npz"))) == 2
    finally:
        await core.close()
    # Restarted with the changed phrase: the heads of the running router, restored, nothing trained.
    restarted = RouterCore(RouterConfig(embedding_cache_dir=str(tmp_path)), encoder)
    restarted.submit(snapshot, 1)
    try:
        await asyncio.wait_for(restarted.wait_builds(1), 120)
        assert restarted.models["g"].times.lr_iterations == 0
        assert np.array_equal(restarted.models["g"].W, changed.W) and restarted.models["g"].tau == changed.tau
        assert len(list((tmp_path / "models").glob("*.npz"))) == 2
    finally:
        await restarted.close()


async def test_a_restart_shows_its_progress_while_it_reads_and_indexes(encoder, tmp_path, monkeypatch, capsys):
    """The long steps of a build have a progress bar (on a terminal, or forced with MBC_PROGRESS=1):
    reading 30,000 cached vectors back, and indexing them (an approximate index at that size)."""
    from mbc.runtime.index import build_index

    texts = [f"phrase {i}" for i in range(30_000)]
    vectors = np.random.default_rng(0).normal(size=(len(texts), encoder.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = EmbeddingStore(tmp_path)
    store.put_many(encoder.model_id, texts, vectors)
    monkeypatch.setenv("MBC_PROGRESS", "1")
    embeddings = PhraseEmbeddings(encoder, store)
    loaded = await embeddings.embed(texts)
    index = build_index(encoder.dim, np.arange(len(texts)), loaded)
    store.close()
    assert embeddings.encoded == 0 and np.array_equal(loaded, vectors) and len(index) == len(texts)
    shown = capsys.readouterr().err
    assert "reading cached phrase vectors: 100%" in shown and "30000/30000" in shown
    assert "indexing phrases: 100%" in shown
