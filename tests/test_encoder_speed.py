"""Encoder speed features: micro-batching, the utterance cache, the ONNX backends (offline), and a
smoke run of `mbc bench match` with tiny counts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from mbc.runtime.config import EncoderConfig
from mbc.runtime.encoder import Encoder, _EncoderThread, _Query

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

REPO = Path(__file__).resolve().parents[1]
CLINC = REPO.parent / "shared" / "data" / "clinc150"
UTTERANCES = [
    "I lost my debit card yesterday",
    "what's the balance on my checking account",
    "how do I open a business account for my LLC",
    "can you raise the limit on my credit card",
    "my card got declined at the supermarket",
    "I want to dispute a charge I don't recognise",
    "send 50 dollars to my savings account",
    "which pizza place near me delivers the fastest",
    "set a reminder to pay my rent on the first",
    "how do you say thank you in french",
    "what is my routing number",
    "book a table for two at seven",
]


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx")


async def test_concurrent_aencode_calls_are_batched_and_equal_single_encodes(encoder) -> None:
    texts = [f"{t} ({i})" for i, t in enumerate(UTTERANCES * 2)]  # not in the utterance cache
    batches, calls = encoder.batch_stats
    vectors = await asyncio.gather(*(encoder.aencode([t]) for t in texts))
    new_batches, new_calls = encoder.batch_stats
    assert new_calls - calls == len(texts)
    assert new_batches - batches < len(texts), "concurrent calls were not batched"
    for text, vector in zip(texts, vectors):
        assert vector.shape == (1, encoder.dim)
        np.testing.assert_allclose(vector[0], encoder.encode([text])[0], atol=1e-5)


async def test_repeated_utterances_come_from_the_cache(encoder) -> None:
    text = "is the cache used for a repeated utterance?"
    first = await encoder.aencode([text])
    calls = encoder.batch_stats[1]
    again = await encoder.aencode([text, text])
    assert encoder.batch_stats[1] == calls
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[0])


class FakeModel:
    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[list[str]] = []
        self.alone: list[bool] = []
        self.seconds = seconds

    def __call__(self, texts: list[str], alone: bool = False) -> np.ndarray:
        self.batches.append(list(texts))
        self.alone.append(alone)
        time.sleep(self.seconds)
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)


def _submit(thread: _EncoderThread, text: str) -> Future:
    future: Future = Future()
    thread.submit(_Query([text], future))
    return future


@pytest.mark.unit
def test_a_lone_call_never_waits_and_concurrent_ones_wait_a_bounded_time() -> None:
    model = FakeModel()
    thread = _EncoderThread(model, max_batch=8, wait_seconds=0.2)
    try:
        started = time.monotonic()
        assert _submit(thread, "alone").result(5)[0, 0] == len("alone")
        assert time.monotonic() - started < 0.15, "a lone call waited for a batch"

        # Two calls queued together: one batch of two. From then on batches wait (bounded).
        busy = threading.Event()
        model_blocking = FakeModel()
        thread._encode = lambda texts, alone: (busy.wait(5), model_blocking(texts, alone))[1]  # hold the thread
        first = _submit(thread, "a")
        time.sleep(0.05)
        second, third = _submit(thread, "bb"), _submit(thread, "ccc")
        busy.set()
        assert [f.result(5)[0, 0] for f in (first, second, third)] == [1, 2, 3]
        assert model_blocking.batches == [["a"], ["bb", "ccc"]]
        assert model.alone == [True], "a lone call on an idle thread may use the engine's fastest path"
        assert model_blocking.alone == [True, False], "a batch of two calls is not alone"

        started = time.monotonic()
        assert _submit(thread, "dddd").result(5)[0, 0] == 4
        waited = time.monotonic() - started
        assert 0.15 <= waited < 1.5, f"bounded wait of 0.2 s took {waited:.3f} s"

        # A full batch does not wait for the deadline.
        thread._concurrent = True
        started = time.monotonic()
        futures = [_submit(thread, "x" * (i + 1)) for i in range(8)]
        assert [f.result(5)[0, 0] for f in futures] == list(range(1, 9))
        assert time.monotonic() - started < 0.15
    finally:
        thread.stop()


@pytest.mark.unit
def test_two_workers_split_the_load_into_fair_batches_and_all_stop() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()
    model = FakeModel()

    def blocking(texts: list[str], alone: bool = False) -> np.ndarray:
        started.release()
        release.wait(5)
        return model(texts, alone)

    thread = _EncoderThread(blocking, max_batch=4, wait_seconds=0.0, workers=2)
    try:
        first = _submit(thread, "a")
        assert started.acquire(timeout=5)
        second = _submit(thread, "bb")
        assert not started.acquire(timeout=0.3), "a one-call batch started while the other worker was busy"
        third = _submit(thread, "ccc")
        assert started.acquire(timeout=5), "the second worker did not take its share while the first was busy"
        fourth = _submit(thread, "dddd")  # waits for a share or for a worker to be done
        release.set()
        assert [f.result(5)[0, 0] for f in (first, second, third, fourth)] == [1, 2, 3, 4]
        assert sorted(model.batches) == [["a"], ["bb", "ccc"], ["dddd"]]
        # Only the first ran alone: the others started beside a busy worker (or after a batch of two).
        assert model.alone.count(True) == 1 and model.alone[model.batches.index(["a"])]

        started_at = time.monotonic()
        assert _submit(thread, "lone").result(5)[0, 0] == 4
        assert time.monotonic() - started_at < 1.0, "a lone call waited with both workers idle"
    finally:
        thread.stop()
    for worker in thread._threads:
        worker.join(5)
        assert not worker.is_alive(), "a worker kept running after stop"
    late = Future()
    thread.submit(_Query(["late"], late))
    assert late.cancelled(), "a call after stop was queued rather than cancelled"


@pytest.mark.unit
def test_cancelled_calls_are_skipped_and_errors_reach_every_caller() -> None:
    def failing(texts: list[str], alone: bool = False) -> np.ndarray:
        raise RuntimeError("model broke")

    thread = _EncoderThread(failing, max_batch=4, wait_seconds=0.0)
    try:
        future = _submit(thread, "x")
        with pytest.raises(RuntimeError, match="model broke"):
            future.result(5)
    finally:
        thread.stop()
    model = FakeModel(seconds=0.1)
    thread = _EncoderThread(model, max_batch=4, wait_seconds=0.0)
    try:
        busy = _submit(thread, "busy")
        time.sleep(0.02)
        cancelled = _submit(thread, "cancelled")
        kept = _submit(thread, "kept")
        assert cancelled.cancel()
        assert kept.result(5)[0, 0] == 4 and busy.result(5)[0, 0] == 4
        assert ["cancelled"] not in model.batches and all("cancelled" not in b for b in model.batches)
    finally:
        thread.stop()


class _Post:
    """A `post` hook that records its calls; equal to another with the same name."""

    calls: list[tuple[str, list[str]]] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Post) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __call__(self, vectors: np.ndarray, texts: list[str]) -> list[str]:
        _Post.calls.append((self.name, list(texts)))
        assert [int(v[0]) for v in vectors] == [len(t) for t in texts]
        if self.name == "broken":
            raise ValueError("scoring broke")
        return [f"{self.name}:{t}" for t in texts]


@pytest.mark.unit
def test_post_hooks_run_once_per_batch_for_equal_hooks_on_the_encoder_thread() -> None:
    model = FakeModel()
    thread = _EncoderThread(model, max_batch=8, wait_seconds=0.0)
    _Post.calls = []
    try:
        busy = threading.Event()
        thread._encode = lambda texts, alone: (busy.wait(5), model(texts, alone))[1]
        first = _submit(thread, "hold")
        time.sleep(0.05)
        queries = [
            _Query(["a"], Future(), _Post("g1")),
            _Query(["bb"], Future(), _Post("g2")),
            _Query(["ccc"], Future(), _Post("g1")),
            # Known vector (the utterance cache): not encoded, still scored with its batch.
            _Query(["dddd"], Future(), _Post("g1"), np.array([[4.0]], np.float32), []),
            _Query(["eeeee"], Future(), _Post("broken")),
        ]
        for q in queries:
            thread.submit(q)
        busy.set()
        assert first.result(5)[0, 0] == 4
        results = [q.future.result(5)[1] for q in queries[:4]]
        assert results == [["g1:a"], ["g2:bb"], ["g1:ccc"], ["g1:dddd"]]
        assert [int(v) for v in queries[3].future.result(5)[0][:, 0]] == [4]
        with pytest.raises(ValueError, match="scoring broke"):
            queries[4].future.result(5)
        assert model.batches == [["hold"], ["a", "bb", "ccc", "eeeee"]]
        assert sorted(_Post.calls) == [("broken", ["eeeee"]), ("g1", ["a", "ccc", "dddd"]), ("g2", ["bb"])]
    finally:
        thread.stop()


def _fake_encoder(model, max_batch: int = 8) -> Encoder:
    """The async API around a fake model, without loading one."""
    encoder = Encoder.__new__(Encoder)
    encoder.config = EncoderConfig(query_cache_size=16)
    encoder.dim = 1
    encoder._queries, encoder._queries_lock = OrderedDict(), threading.Lock()
    encoder._thread = _EncoderThread(model, max_batch=max_batch, wait_seconds=0.0)
    return encoder


class _GatedModel(FakeModel):
    """A fake model whose batch i waits for `release[i]` (and sets `entered[i]` first)."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.entered = [threading.Event() for _ in range(batches)]
        self.release = [threading.Event() for _ in range(batches)]

    def __call__(self, texts: list[str], alone: bool = False) -> np.ndarray:
        i = len(self.batches)
        self.entered[i].set()
        self.release[i].wait(5)
        return super().__call__(texts, alone)


async def _until(condition, seconds: float = 5.0) -> None:
    """Polls on the loop's timers (no thread hands anything to the loop meanwhile)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.unit
async def test_a_batch_of_aencode_calls_wakes_the_loop_once_and_skips_the_callers_gone() -> None:
    model = _GatedModel(batches=2)
    encoder = _fake_encoder(model, max_batch=64)
    loop = asyncio.get_running_loop()
    wakes: list[object] = []
    original = loop.call_soon_threadsafe

    def spy(callback, *args, **kwargs):
        wakes.append(callback)
        return original(callback, *args, **kwargs)

    try:
        hold = asyncio.create_task(encoder.aencode(["hold"]))
        await _until(model.entered[0].is_set)
        texts = ["q" * (i + 1) for i in range(8)]
        tasks = [asyncio.create_task(encoder.aencode([t])) for t in texts]
        await _until(lambda: len(encoder._thread._items) == len(texts))
        loop.call_soon_threadsafe = spy  # type: ignore[method-assign]
        tasks[2].cancel()  # gone before its batch starts: not encoded
        await asyncio.sleep(0)
        model.release[0].set()
        await _until(model.entered[1].is_set)
        tasks[5].cancel()  # gone while its batch is encoded: the others still get theirs
        model.release[1].set()
        results = await asyncio.wait_for(asyncio.gather(hold, *tasks, return_exceptions=True), 5)
    finally:
        del loop.call_soon_threadsafe
        encoder._thread.stop()
    assert model.batches == [["hold"], [t for i, t in enumerate(texts) if i != 2]]
    assert len(wakes) == len(model.batches), f"{len(wakes)} loop wake-ups for {len(model.batches)} batches"
    assert results[0][0, 0] == 4
    for i, (text, result) in enumerate(zip(texts, results[1:])):
        if i in (2, 5):
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert result.shape == (1, 1) and result[0, 0] == len(text)


@pytest.mark.unit
async def test_stop_from_another_thread_cancels_the_queued_aencode_calls() -> None:
    model = _GatedModel(batches=1)
    encoder = _fake_encoder(model)
    hold = asyncio.create_task(encoder.aencode(["hold"]))
    await _until(model.entered[0].is_set)
    queued = [asyncio.create_task(encoder.aencode([t])) for t in ("a", "bb")]
    await _until(lambda: len(encoder._thread._items) == 2)
    await asyncio.to_thread(encoder._thread.stop)
    model.release[0].set()
    results = await asyncio.wait_for(asyncio.gather(hold, *queued, return_exceptions=True), 5)
    assert results[0][0, 0] == 4, "the batch being encoded finishes"
    assert all(isinstance(r, asyncio.CancelledError) for r in results[1:])
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(encoder.aencode(["late"]), 5)


@pytest.mark.unit
def test_submit_notifies_only_when_a_worker_waits_and_loses_no_wake_up() -> None:
    model = _GatedModel(batches=3)
    thread = _EncoderThread(model, max_batch=8, wait_seconds=0.0)
    notified: list[int] = []
    original = thread._changed.notify

    def spy(n: int = 1) -> None:
        notified.append(n)
        original(n)

    thread._changed.notify = spy  # type: ignore[method-assign]
    try:
        time.sleep(0.05)  # the idle worker waits
        first = _submit(thread, "a")
        assert model.entered[0].wait(5) and notified == [1]
        queued = [_submit(thread, t) for t in ("bb", "ccc")]
        assert notified == [1], "notified while no worker waited"
        model.release[0].set()
        model.release[1].set()
        assert [f.result(5)[0, 0] for f in (first, *queued)] == [1, 2, 3]
        time.sleep(0.05)
        model.release[2].set()
        assert _submit(thread, "dddd").result(5)[0, 0] == 4, "a wake-up was lost"
        assert model.batches == [["a"], ["bb", "ccc"], ["dddd"]]
    finally:
        thread.stop()


@pytest.mark.unit
async def test_aencode_with_post_uses_the_cache_and_returns_one_result_per_text() -> None:
    model = FakeModel()
    encoder = _fake_encoder(model)
    _Post.calls = []
    try:
        results = await asyncio.gather(*(encoder.aencode([t], post=_Post("g")) for t in ["x", "yy", "x"]))
        assert results == [["g:x"], ["g:yy"], ["g:x"]]
        assert await encoder.aencode(["yy", "zzz"], post=_Post("g")) == ["g:yy", "g:zzz"]
        assert ["yy", "zzz"] not in model.batches and ["zzz"] in model.batches  # "yy" came from the cache
        assert [int(v) for v in (await encoder.aencode(["zzz"]))[:, 0]] == [3]
    finally:
        encoder._thread.stop()


_OFFLINE_SCRIPT = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
from mbc.runtime.config import EncoderConfig
from mbc.runtime.encoder import Encoder
texts = json.loads(sys.argv[3])
out = {}
for backend in ("torch", "onnx", "onnx-int8"):
    e = Encoder(EncoderConfig(backend=backend, onnx_dir=sys.argv[1]))
    out[backend] = e.encode(texts).tolist()
    e.close()
print(json.dumps(out))
"""


def test_onnx_backends_load_offline_and_agree_with_torch(onnx_dir: Path) -> None:
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _OFFLINE_SCRIPT, str(onnx_dir), "", json.dumps(UTTERANCES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    vectors = json.loads(done.stdout.strip().splitlines()[-1])
    reference = np.array(vectors["torch"])
    for backend, min_cosine in (("onnx", 0.9999), ("onnx-int8", 0.9)):
        got = np.array(vectors[backend])
        cosines = (reference * got).sum(axis=1)
        assert cosines.min() >= min_cosine, (backend, cosines)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert list(onnx_dir.glob("*/model.onnx")) and list(onnx_dir.glob("*/model_int8.onnx")), "exports not cached"


@pytest.mark.timeout(480)
def test_bench_match_smoke(tmp_path: Path, onnx_dir: Path) -> None:
    if not (CLINC / "clinc150_public.json").exists():
        pytest.skip(f"no CLINC150 data at {CLINC}")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbc",
            "bench",
            "match",
            "--json",
            str(out),
            "--data",
            str(CLINC),
            "--onnx-dir",
            str(onnx_dir),
            "--intents-per-domain",
            "1",
            "--phrases-per-intent",
            "3",
            "--single-samples",
            "10",
            "--batch-texts",
            "32",
            "--warmup-requests",
            "8",
            "--naive-requests",
            "32",
            "--c1-requests",
            "10",
            "--c32-requests",
            "64",
            "--respond-c1-requests",
            "5",
            "--respond-c32-requests",
            "20",
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=460,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (
        "encoder_single_ms",
        "encoder_batch_qps",
        "naive_qps_c32",
        "match_qps_c32",
        "match_p50_ms_c1",
        "match_p99_ms_c1",
        "match_p99_ms_c32",
    ):
        assert result[key] > 0, key
    assert result["errors"] == 0
    assert result["settings"]["tuned"]["backend"] == "onnx"
    assert result["settings"]["naive"] == {
        "backend": "torch",
        "threads": 0,
        "workers": 1,
        "batch_size": 16,
        "max_batch": 1,
        "batch_wait_ms": 0.0,
        "query_cache_size": 0,
        "idle_spinning": False,
    }
    assert result["settings"]["tuned"]["workers"] == 2
    setups = result["details"]["encoder_by_setup"]
    assert set(setups) == {"threads=1 workers=2", "threads=default workers=1"}
    both = [*setups.values(), *result["details"]["encoder_by_setup_after"].values()]  # measured before and after the routers
    assert result["encoder_batch_qps"] == max(q for s in both for q in s["qps_by_batch_size"].values())
    assert "match_qps_c32" in done.stdout and ("MET" in done.stdout or "MISS" in done.stdout)
    # The serving floor: an empty Match through the same stack, served and loaded for real.
    floor = result["floor"]
    assert floor["p50_ms_c1"] > 0 and floor["qps_c32"] > 0 and floor["cpu_ms_per_call_c32"] > 0
    assert any(p["phase"] == "floor_c32" and p["ok"] == 64 for p in result["details"]["phases"])
    # Measured again after the routers: each bound takes the better of the two measurements.
    phases = {p["phase"]: p for p in result["details"]["phases"]}
    assert phases["floor_after_c32"]["ok"] == 64
    assert floor["p50_ms_c1"] == min(phases["floor_c1"]["p50_ms"], phases["floor_after_c1"]["p50_ms"])
    assert set(result["details"]["encoder_by_setup_after"]) == set(setups)
    # Where the tuned router's time went, read from its /metrics and its CPU time.
    c1, c32 = result["breakdown"]["c1"], result["breakdown"]["c32"]
    assert c1["utterances_per_batch"] == 1.0 and 0 < c1["encode_ms"] < c1["mean_ms"] and c1["score_ms"] > 0
    assert c32["encode_ms"] > 0 and c32["score_ms"] > 0 and c32["utterances_per_batch"] >= 1
    assert c32["cpu_ms_per_match"] == pytest.approx(c32["router_cpu_ms"] + c32["loadgen_cpu_ms"], abs=0.002)
    bounds = result["bounds"]
    assert bounds["match_p50_ms_c1"] == pytest.approx(bounds["encoder_single_after_pause_ms"] + floor["p50_ms_c1"], abs=0.011)
    assert bounds["match_qps_c32"] == pytest.approx(
        bounds["cores"] * 1000 / (bounds["encoder_cpu_ms_per_utterance"] + floor["cpu_ms_per_call_c32"]), rel=1e-3
    )
    assert "serving floor" in done.stdout and "best possible" in done.stdout
    # Issue 18: the router's CPU against encoder + empty Match, and a Respond that transfers on a real mesh.
    assert result["router_cpu_ratio_c32"] > 0
    assert bounds["respond_p50_ms_c1"] == pytest.approx(
        bounds["match_p50_ms_c1"] + bounds["respond_round_trips"] * floor["p50_ms_c1"], abs=0.011
    )
    respond = result["breakdown"]["respond"]
    assert respond["c1"]["transferred_share"] > 0 and result["respond_p50_ms_c1"] > 0 and result["respond_p99_ms_c32"] > 0
    assert set(respond["c32"]["cpu_ms_per_respond"]) >= {"entry_bot", "router", "receivers", "store", "etcd", "loadgen"}
    assert "router_cpu_ratio_c32 <= 1.2" in result["targets"] and "respond_p50_ms_c1" in done.stdout
    print(f"bench smoke took {time.monotonic() - started:.0f} s")


@pytest.mark.unit
@pytest.mark.parametrize("analyzer", ["word", "char_wb"])
def test_lexical_svm_analyses_texts_like_sklearn_without_importing_it(analyzer: str) -> None:
    """Restored heads score with our analysers (no sklearn import before SERVING): same terms."""
    from router.decision import LexicalSvm, analyze

    sklearn_analyze = LexicalSvm._vectorizer(analyzer).build_analyzer()
    texts = [
        *UTTERANCES,
        "",
        "a",
        "I I I",
        "Ünïcode CAFÉ naïve straße ΣΊΣΥΦΟΣ",
        "snake_case 42 x9 don't e-mail me@example.com",
        "tabs\tand\nnewlines  and   spaces",
        "日本語のテキスト と 中文 文本",
        "it's £5, or 5€ — fine?!",
        " leading, trailing and a  double space ",
        "ab abc abcd abcde abcdef",
        *_phrases(),
    ]
    for text in texts:
        assert analyze(analyzer, text) == sklearn_analyze(text), text


@pytest.mark.unit
@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("analyzer", ["word", "char_wb"])
def test_lexical_svm_scores_like_sklearn(classes: int, analyzer: str) -> None:
    """The router's SVM heads skip sklearn's per-call validation, not its arithmetic."""
    from sklearn.svm import LinearSVC

    from router.decision import LexicalSvm

    texts = [f"{t} {w}" for t in UTTERANCES for w in ("please", "now", "today for me")]
    labels = np.arange(len(texts)) % classes
    vectorizer = LexicalSvm._vectorizer(analyzer)
    svm = LinearSVC(C=1.0).fit(vectorizer.fit_transform(texts), labels)
    queries = [*UTTERANCES[:4], "card card card declined declined", "zzz unknown words only", "", "LOST my CARD!!"]
    expected = svm.decision_function(vectorizer.transform(queries))
    if classes == 2:
        expected = np.stack([-expected, expected], axis=1)
    head = LexicalSvm(vectorizer.vocabulary_, vectorizer.idf_, svm.coef_.T, svm.intercept_, svm.classes_, analyzer)
    got = head.decision_function(queries)
    assert got.shape == (len(queries), classes)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # float32 weights
    assert list(head.classes) == list(range(classes))
    # More texts than one product takes (SCORE_CHUNK): scored in chunks, the same values.
    np.testing.assert_allclose(head.decision_function(queries * 40), np.tile(got, (40, 1)), rtol=0, atol=1e-6)
    # One at a time (each word's terms now cached) as in a micro-batch.
    np.testing.assert_allclose(np.vstack([head.decision_function([q]) for q in queries]), got, rtol=0, atol=1e-6)
    vocabulary, arrays = head.state()  # what a restarted router reads back scores the same
    np.testing.assert_array_equal(LexicalSvm(vocabulary, **arrays, analyzer=analyzer).decision_function(queries), got)


@pytest.mark.unit
@pytest.mark.parametrize("seed", range(6))
def test_packed_rows_hold_every_input_once_and_leave_at_most_one_row_half_empty(seed: int) -> None:
    from mbc.runtime.encoder import pack_rows

    rng = np.random.default_rng(seed)
    row_tokens = int(rng.choice([8, 32, 64]))
    lengths = rng.integers(1, 2 * row_tokens, size=int(rng.integers(1, 200))).tolist()
    rows = pack_rows(lengths, row_tokens)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fill = [sum(lengths[i] for i in row) for row in rows]
    for row, tokens in zip(rows, fill):
        assert tokens <= row_tokens or len(row) == 1, "only an input longer than a row is alone past the limit"
    # Best-fit decreasing: a row left half empty would have taken the inputs of a later one.
    assert sum(1 for row, tokens in zip(rows, fill) if tokens <= row_tokens // 2) <= 1
    assert pack_rows([], row_tokens) == []


@pytest.mark.unit
def test_forward_passes_keep_short_rows_apart_from_a_long_one() -> None:
    from mbc.runtime.encoder import plan_runs

    widths = [32] * 30 + [256, 31, 12, 17, 70]
    runs = plan_runs(widths, max_rows=16)
    assert sorted(r for run in runs for r in run) == list(range(len(widths)))
    assert all(len(run) <= 16 for run in runs)
    for run in runs:
        widest = max(widths[r] for r in run)
        assert all(widest - widths[r] <= 12 + widths[r] for r in run), [widths[r] for r in run]
    assert [widths[r] for r in runs[0]] == [256], "the long row was not alone"
    narrow = [32, 31, 20, 12, 9]
    assert [[narrow[r] for r in run] for run in plan_runs(narrow, max_rows=16, overhead=12)] == [
        [32, 31, 20, 12],
        [9],
    ], "a row is padded when that costs less than a pass of its own"


@pytest.mark.unit
def test_auto_backend_takes_torch_for_a_model_the_onnx_export_cannot_pack(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from mbc.runtime.encoder import default_model_path, model_type, resolve_backend

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlm-roberta"}))
    assert resolve_backend("auto", str(tmp_path)) == "torch"
    assert model_type(Path(default_model_path())) == "bert"
    assert resolve_backend("auto", default_model_path()) == "onnx"


@pytest.mark.parametrize("threads", [0, 1])
def test_onnx_encoder_gives_the_same_vectors_alone_and_in_a_batch_of_mixed_lengths(onnx_dir: Path, threads: int) -> None:
    """The rows a batch is packed into (several inputs side by side, each attending only to its own
    tokens) and the spinning session of a lone call (on every core even when batches run on one
    thread) change nothing."""
    from mbc.runtime.encoder import Encoder

    encoder = Encoder(EncoderConfig(backend="onnx", onnx_dir=str(onnx_dir), threads=threads))
    # Short and long inputs (one of exactly a row, one past it, one truncated at the model's
    # limit), repeated: more rows than a pass holds, passes of different widths.
    words = ["please", "move", "fifty", "dollars", "from", "my", "checking", "account", "to", "savings", "before", "friday"]
    texts = (UTTERANCES + [" ".join((words * 40)[:n]) for n in (30, 31, 60, 400)]) * 5
    try:
        batch = encoder.encode(texts)
        lengths = {len(encoder._backend._tokenizer.encode(t).ids) for t in texts}
        assert {32, 33, 62, 256} <= lengths, lengths
        for text, vector in zip(texts, batch):
            np.testing.assert_allclose(encoder.encode([text], alone=True)[0], vector, atol=2e-5)
    finally:
        encoder.close()


def _phrases() -> list[str]:
    """A few hundred phrases: the example bots' training phrases and the generic out-of-scope set."""
    from bot_server.bot import Bot

    phrases = [
        p
        for path in sorted((REPO / "examples").glob("*.yaml"))
        for i in Bot.from_file(path).definition.intents
        for p in i.phrases
    ]
    phrases += (REPO / "router" / "data" / "generic_none.txt").read_text().splitlines()
    return list(dict.fromkeys(p.strip() for p in phrases if p.strip()))


def test_onnx_float32_gives_torch_vectors_so_they_share_cached_vectors(onnx_dir: Path) -> None:
    """The embedding and heads caches key float32 ONNX vectors like torch's (`model_id_of`): that
    holds only while they are equal to a tight tolerance, on hundreds of phrases. int8 never shares."""
    pytest.importorskip("onnxruntime")
    from mbc.runtime.encoder import Encoder

    phrases = _phrases()
    assert len(phrases) >= 300
    torch_encoder = Encoder(EncoderConfig(backend="torch"))
    onnx_encoder = Encoder(EncoderConfig(backend="onnx", onnx_dir=str(onnx_dir)))
    try:
        reference, got = torch_encoder.encode(phrases), onnx_encoder.encode(phrases)
        cosines = (reference * got).sum(axis=1)
        assert cosines.min() >= 0.9999, (float(cosines.min()), phrases[int(cosines.argmin())])
        assert float(np.abs(reference - got).max()) < 1e-4
        assert onnx_encoder.model_id == torch_encoder.model_id
    finally:
        torch_encoder.close()
        onnx_encoder.close()
    from mbc.runtime.encoder import model_id_of

    assert model_id_of("m", "onnx-int8") != model_id_of("m", "torch")


_NO_TORCH_SCRIPT = """
import json, sys
from mbc.runtime.config import EncoderConfig, RouterConfig
from mbc.runtime.encoder import Encoder
e = Encoder(EncoderConfig(backend=RouterConfig().encoder.backend, onnx_dir=sys.argv[1]))
e.encode(["hello"])
heavy = sorted(m for m in ("torch", "transformers", "sentence_transformers", "sklearn", "scipy") if m in sys.modules)
print(json.dumps({"backend": e.config.backend, "heavy": heavy}))
"""


def test_the_router_default_loads_an_exported_onnx_model_without_torch(onnx_dir: Path) -> None:
    """The router's default backend ("auto") is onnx when onnxruntime is installed, and once the
    model is exported it loads with neither torch, transformers nor sentence-transformers."""
    pytest.importorskip("onnxruntime")
    from mbc.runtime.encoder import Encoder

    Encoder(EncoderConfig(backend="onnx", onnx_dir=str(onnx_dir))).close()  # exported (imports torch here)
    done = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(onnx_dir)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"backend": "onnx", "heavy": []}
