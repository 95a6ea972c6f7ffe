"""The vector index: exact below the size threshold, IVF above, same answers on real utterances."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

from mbc.bench.index import synthetic_participants
from mbc.bench.match import default_data_dir, load_clinc
from mbc.runtime import int8_scan
from mbc.runtime.index import EXACT_MAX_VECTORS, FlatIndex, IVFIndex, build_index

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

DIM = 384
pytestmark = pytest.mark.timeout(900)  # the model embeds 1,600 texts: minutes on two loaded cores


def _unit(rows: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _require_clinc() -> None:
    if not (default_data_dir() / "clinc150_public.json").exists():
        pytest.skip(f"no CLINC150 data at {default_data_dir()} (set MBC_CLINC150)")


@pytest.fixture(scope="module")
def clinc(encoder):
    """Real phrases of one CLINC150 domain (rows of each intent) and real val utterances, embedded."""
    _require_clinc()
    domains, train, _, _ = load_clinc(default_data_dir())
    phrases, intents = [], []
    names = sorted(domains[sorted(domains)[0]])
    for name in names:
        intents.append((len(phrases), len(phrases) + len(train[name])))
        phrases.extend(train[name])
    # Utterances for these intents (out-of-scope ones have no clear nearest phrase to agree on).
    labelled = json.loads((default_data_dir() / "clinc150_public.json").read_text())["val"]
    queries = [text for text, intent in labelled if intent in names]
    return encoder.encode(phrases), encoder.encode(queries), np.asarray(intents)


@pytest.fixture(scope="module")
def ivf_and_exact(clinc):
    """30,000 vectors: the real phrases plus realistic synthetic participants, in both index types."""
    real, _, intents = clinc
    vectors = np.concatenate([real, synthetic_participants(real, intents, 0, (30_000 - len(real)) // 100, seed=3)])
    ids = np.arange(len(vectors), dtype=np.int64)
    ivf = IVFIndex(DIM, vectors)
    ivf.add(ids, vectors)
    exact = FlatIndex(DIM)
    exact.add(ids, vectors)
    return ivf, exact, vectors


@pytest.mark.unit
def test_factory_picks_exact_below_the_threshold_and_ivf_from_it():
    below = _unit(EXACT_MAX_VECTORS - 1)
    small = build_index(DIM, np.arange(len(below)), below)
    assert isinstance(small, FlatIndex) and len(small) == EXACT_MAX_VECTORS - 1
    at = np.concatenate([below, _unit(1, seed=1)])
    large = build_index(DIM, np.arange(len(at)), at)
    assert isinstance(large, IVFIndex) and len(large) == EXACT_MAX_VECTORS
    # Each finds a stored vector as its own nearest neighbour, with its cosine (~1).
    scores, ids = large.search(at[[5, 777, EXACT_MAX_VECTORS - 1]], 3)
    assert ids[:, 0].tolist() == [5, 777, EXACT_MAX_VECTORS - 1]
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-3)


def test_ivf_top1_equals_exact_on_real_utterances(clinc, ivf_and_exact):
    _, queries, _ = clinc
    ivf, exact, _ = ivf_and_exact
    s_ivf, i_ivf = ivf.search(queries, 100)
    s_exact, i_exact = exact.search(queries, 100)
    agreement = float(np.mean(i_ivf[:, 0] == i_exact[:, 0]))
    assert agreement >= 0.97, agreement
    same = i_ivf[:, 0] == i_exact[:, 0]
    # Re-ranked with the vectors (float16): the scores are the cosines, not PQ estimates.
    assert np.abs(s_ivf[same, 0] - s_exact[same, 0]).max() < 1e-3
    assert (np.diff(s_ivf, axis=1) <= 1e-6).all()  # best first


def test_the_int8_shortlist_keeps_the_exact_neighbours_alone_or_batched(clinc):
    """From 2,048 vectors FlatIndex scores exactly only a shortlist from its int8 copy: on real
    phrases and utterances, the top-k is still the brute-force one, scores and all, for a lone
    query and in a batch, with or without an excluded range, however few vectors are left."""
    real, queries, intents = clinc
    vectors = np.concatenate([real, synthetic_participants(real, intents, 0, 30, seed=5)])  # 4,500: shortlisted
    index = FlatIndex(DIM)
    index.add(np.arange(len(vectors)), vectors)
    ranges = [None, (0, 150), (150, 4000), (0, len(vectors) - 120)]  # the last leaves 120, under k + margin
    batch = queries[:60]
    for exclude in ranges:
        scores = batch @ vectors.T
        if exclude is not None:
            scores[:, exclude[0] : exclude[1]] = -np.inf
        want = np.argsort(-scores, axis=1, kind="stable")[:, :100]
        batch_scores, batch_ids = index.search(batch, 100, exclude=exclude)
        for i, q in enumerate(batch):
            lone_scores, lone_ids = index.search(q[None, :], 100, exclude=exclude)
            kept = want[i][np.isfinite(scores[i, want[i]])]
            assert set(lone_ids[0][lone_ids[0] >= 0].tolist()) == set(kept.tolist())
            np.testing.assert_array_equal(lone_ids[0], batch_ids[i])  # a Match ranks the same alone or batched
            np.testing.assert_allclose(lone_scores[0][: len(kept)], scores[i, kept], atol=1e-5)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_remove_and_exclude(kind, ivf_and_exact):
    vectors = ivf_and_exact[2]
    index = FlatIndex(DIM) if kind == "exact" else IVFIndex(DIM, vectors)
    index.add(np.arange(len(vectors)), vectors)
    probe = vectors[1000:1100]
    _, ids = index.search(probe, 5, exclude=(1000, 1100))
    assert ((ids < 1000) | (ids >= 1100)).all() and (ids >= 0).all()

    index.remove(np.arange(1000, 1100))
    assert len(index) == len(vectors) - 100
    _, ids = index.search(probe, 20)
    assert not np.isin(ids, np.arange(1000, 1100)).any()

    # The same ids back with other vectors: found by the new vectors, once each.
    replacement = vectors[5000:5100]
    index.add(np.arange(1000, 1100), replacement)
    assert len(index) == len(vectors)
    _, ids = index.search(replacement, 10)
    assert all(1000 + i in ids[i, :2] for i in range(100))  # beside its twin 5000 + i, same vector
    for row in ids:
        kept = row[row >= 0]
        assert len(kept) == len(set(kept.tolist()))


def test_ivf_replacements_stay_exact_and_drift_is_reported(ivf_and_exact):
    vectors = ivf_and_exact[2]
    n = len(vectors)
    index = IVFIndex(DIM, vectors, nlist=128)  # lists for ~16k vectors: 30k fit (within 4×)
    index.add(np.arange(n), vectors)
    for start in range(0, 6000, 100):  # 60 participants of 100 phrases replaced
        index.remove(np.arange(start, start + 100))
        index.add(np.arange(start, start + 100), vectors[start + 10_000 : start + 10_100])
    assert len(index) == n and index.entries == n + 6000 and not index.drifted
    scores, ids = index.search(vectors[10_000:10_050], 2)
    # Each new vector is found under its new id, beside its twin (10,000 + i), the old code forgotten.
    assert all(i in ids[i] and 10_000 + i in ids[i] for i in range(50))
    assert scores[:, 1] == pytest.approx(1.0, abs=1e-3)
    index.remove(np.arange(n))
    index.add(np.arange(n), vectors)
    assert len(index) == n and index.drifted  # more stale entries than live ones: time to rebuild


def test_fresh_vectors_are_found_before_and_after_they_are_folded_into_the_lists(ivf_and_exact):
    vectors = ivf_and_exact[2]
    index = IVFIndex(DIM, vectors, nlist=128)
    index.FRESH_MAX = 250
    index.add(np.arange(20_000), vectors[:20_000])
    exact = FlatIndex(DIM)
    exact.add(np.arange(20_000), vectors[:20_000])
    for start in range(20_000, 20_300, 100):  # three participants: the third one folds the segment
        ids = np.arange(start, start + 100)
        index.add(ids, vectors[ids])
        exact.add(ids, vectors[ids])
        _, found = index.search(vectors[ids[:20]], 1)
        assert (found[:, 0] == ids[:20]).all(), "a participant is searchable as soon as it is added"
    assert index.entries == 20_300
    index.remove(np.arange(20_000, 20_100))
    exact.remove(np.arange(20_000, 20_100))
    queries = vectors[20_000:20_300]
    _, got = index.search(queries, 1, exclude=(20_200, 20_300))
    _, want = exact.search(queries, 1, exclude=(20_200, 20_300))
    assert np.mean(got[:, 0] == want[:, 0]) >= 0.97
    assert not np.isin(got, np.arange(20_000, 20_100)).any() and not np.isin(got, np.arange(20_200, 20_300)).any()


def test_ivf_answers_while_participants_are_replaced(ivf_and_exact):
    ivf, _, vectors = ivf_and_exact
    errors: list[BaseException] = []
    stop = threading.Event()

    def search() -> None:
        try:
            while not stop.is_set():
                _, ids = ivf.search(vectors[20_000:20_001], 10)
                assert ids[0, 0] == 20_000
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=search)
    thread.start()
    try:
        for start in range(25_000, 27_000, 100):
            ids = np.arange(start, start + 100)
            ivf.remove(ids)
            ivf.add(ids, vectors[start : start + 100])
            _, found = ivf.search(vectors[start : start + 1], 1)
            assert found[0, 0] == start  # visible as soon as add returns
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors and not thread.is_alive()


def test_bench_index_smoke_writes_every_figure(tmp_path):
    _require_clinc()
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mbc",
            "bench",
            "index",
            "--vectors",
            "3000",
            "--queries",
            "40",
            "--swaps",
            "2",
            "--restart-phrases",
            "500",
            "--domains",
            "1",
            "--backend",
            "torch",
            "--embedding-cache",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    result = json.loads(out.read_text())
    for key in (
        "vectors",
        "index_type",
        "build_seconds",
        "rss_mb",
        "search_p50_ms",
        "search_p99_ms",
        "top1_agreement",
        "swap_search_p99_ms",
        "swap_visible_ms",
        "restart_ready_seconds",
        "router_swap_visible_ms",
        "router_rss_mb",
        "load_average",
    ):
        assert result[key] is not None, key
    assert result["vectors"] == 3000 and result["index_type"] == "exact"
    assert result["top1_agreement"] == 1.0  # exact search agrees with itself
    assert result["restart_encoded"] == 0 and result["restart_phrases"] == 500


@pytest.mark.unit
@pytest.mark.parametrize("shortlist", [True, False], ids=["int8-shortlist", "product-only"])
def test_exact_index_returns_the_brute_force_neighbours_with_exclusions_and_changes(shortlist, monkeypatch):
    """With the int8 shortlist (3,000 vectors) and without it (no onnxruntime): the same neighbours."""
    if shortlist and not int8_scan.AVAILABLE:
        pytest.skip("the int8 scan needs the onnx extra")
    monkeypatch.setattr(int8_scan, "AVAILABLE", shortlist)
    vectors = _unit(3000, seed=7)
    ids = np.arange(10_000, 13_000, dtype=np.int64)  # ids need not be row numbers
    index = FlatIndex(DIM)
    index.add(ids[:2000], vectors[:2000])
    index.add(ids[2000:], vectors[2000:])
    queries = _unit(9, seed=8)

    def brute(keep: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ vectors[keep].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), ids[keep][order]

    want_scores, want_ids = brute(np.ones(3000, bool), 50)
    for copies in (0, 1, 70):  # a lone query, a batch, 630 queries (searched in pieces)
        batch = np.tile(queries, (copies, 1)) if copies else queries[:1]
        scores, found = index.search(batch, 50)
        np.testing.assert_array_equal(found, np.tile(want_ids, (max(copies, 1), 1))[: len(batch)])
        np.testing.assert_allclose(scores, np.tile(want_scores, (max(copies, 1), 1))[: len(batch)], atol=1e-5)

    excluded = (ids >= 10_500) & (ids < 11_500)
    scores, found = index.search(queries, 50, exclude=(10_500, 11_500))
    np.testing.assert_array_equal(found, brute(~excluded, 50)[1])

    index.remove(ids[:2500])
    assert len(index) == 500
    scores, found = index.search(queries, 800, exclude=(12_500, 12_700))  # more asked than left
    assert found.shape == (9, 500)
    assert (found[:, :300] >= 12_700).all() and (found[:, 300:] == -1).all()
    assert np.isneginf(scores[:, 300:]).all() and (np.diff(scores[:, :300], axis=1) <= 0).all()
