"""`mbc bench index`: the router's intent index at scale (build, memory, search, agreement, swap, restart).

The index holds the real CLINC150 training phrases of the 10-bot mesh (one participant per domain,
15,000 phrases, embedded with the real model) plus synthetic participants up to `--vectors`. A
synthetic participant has 100 phrases around one real intent picked at random: each phrase is a
random mixture (weights 0.3-0.7) of two real phrases of that intent plus Gaussian noise (σ = 0.03
per dimension), normalised; so it sits where real utterances land, close to real phrases of its
intent, the hard case for an approximate index. The queries are distinct CLINC150 `val`
utterances, embedded with the real model; searches ask k = 100 (the router's `neighbours`), one
query at a time, on one FAISS thread as in the router, and exclude encoding.

Measured in a separate process that holds only the index and the bench's arrays (no model), so
its RSS is the index's cost (`rss_mb`; `rss_baseline_mb` is that process before the index):

- `build_seconds`: training plus adding every vector (generation excluded);
- `search_p50_ms` / `search_p99_ms`;
- `top1_agreement`: share of queries whose first result (id, hence participant) equals exact
  search over the same vectors (computed chunk by chunk, never holding them all in float32);
- swap: while a thread searches without pause, participants of 100 phrases are replaced one after
  another (remove their ids, add 100 new vectors); `swap_visible_ms` is the slowest time from the
  start of a replacement until a search of that thread finds its new phrases,
  `swap_search_p99_ms` the p99 of the searches made meanwhile (`steady_search_p99_ms`: the same
  thread before the swaps).

In another process of its own, the router itself (`RouterCore`, the real model) with one group of
`--restart-phrases` phrases, synthetic participants of 100 phrases (a large group: no heads):

- `restart_ready_seconds`: from creating the router on a persisted embedding cache (seeded
  beforehand with the synthetic vectors under the model's id) until it answers Match: every vector
  read back (`restart_encoded` counts those that needed the model: 0), index built, τ fitted;
- `router_rss_mb`: that process's RSS then (`router_rss_baseline_mb`: with the model loaded,
  before the router; `router_rss_peak_mb`: its peak, while building);
- `router_swap_visible_ms`: a participant registers again with 100 new phrases (embedded by the
  model); the time until Match answers one of them with its new intent.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mbc.bench.clinc import default_data_dir, load_clinc
from mbc.runtime.config import EncoderConfig, RouterConfig
from mbc.runtime.encoder import Encoder
from mbc.v1 import participant_pb2
from router.embedding_store import EmbeddingStore, PhraseEmbeddings, open_store

# faiss, and the modules that load it (mbc.runtime.index, router.core), are imported where they
# are used: `mbc` imports this module to build its command line, and every `mbc` command would
# otherwise load faiss and its OpenMP runtime.

PHRASES_PER_PARTICIPANT = 100
NOISE = 0.03
CHUNK = 100_000
NEIGHBOURS = 100
"""k of every search: DecisionConfig.neighbours."""


@dataclass(frozen=True)
class IndexBenchOptions:
    vectors: int = 1_000_000
    queries: int = 1000
    swaps: int = 20
    restart_phrases: int = 100_000
    domains: int = 0
    """Real CLINC150 domains (bots) in the index; 0: all 10."""
    seed: int = 7


def _rss_mb(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process (or of process `pid`) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return round(fields.get("VmRSS", 0.0), 1), round(fields.get("VmHWM", 0.0), 1)


def synthetic_participants(real: np.ndarray, intents: np.ndarray, first: int, count: int, seed: int) -> np.ndarray:
    """Vectors of `count` synthetic participants numbered from `first` (deterministic per number).

    `intents` holds the [start, end) rows of each real intent in `real`."""
    out = np.empty((count * PHRASES_PER_PARTICIPANT, real.shape[1]), np.float32)
    for n in range(count):
        rng = np.random.default_rng((seed, first + n))
        start, end = intents[rng.integers(len(intents))]
        a = rng.integers(start, end, PHRASES_PER_PARTICIPANT)
        b = rng.integers(start, end, PHRASES_PER_PARTICIPANT)
        w = rng.uniform(0.3, 0.7, (PHRASES_PER_PARTICIPANT, 1)).astype(np.float32)
        v = w * real[a] + (1 - w) * real[b] + rng.normal(0, NOISE, (PHRASES_PER_PARTICIPANT, real.shape[1])).astype(np.float32)
        out[n * PHRASES_PER_PARTICIPANT : (n + 1) * PHRASES_PER_PARTICIPANT] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def _chunks(real: np.ndarray, intents: np.ndarray, total: int, seed: int):
    """(first id, vectors) covering ids 0..total-1: the real phrases, then synthetic participants."""
    yield 0, real
    participants = (total - len(real) + PHRASES_PER_PARTICIPANT - 1) // PHRASES_PER_PARTICIPANT
    per_chunk = CHUNK // PHRASES_PER_PARTICIPANT
    for first in range(0, participants, per_chunk):
        count = min(per_chunk, participants - first)
        vectors = synthetic_participants(real, intents, first, count, seed)
        start = len(real) + first * PHRASES_PER_PARTICIPANT
        yield start, vectors[: total - start]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def measure_index(real_path: str, queries_path: str, intents: list[tuple[int, int]], opts: IndexBenchOptions) -> dict:
    """Everything measured in the process holding the index (see the module docstring)."""
    _faiss_threads(os.cpu_count() or 1)
    real, queries = np.load(real_path), np.load(queries_path)
    bounds = np.asarray(intents, np.int64)
    total = max(opts.vectors, len(real))
    gc.collect()
    baseline, _ = _rss_mb()
    index, index_type, params, train_seconds = _new_index(real, bounds, total, opts.seed)
    add_seconds, exact_id = _fill(index, real, bounds, queries, total, opts.seed)
    gc.collect()
    rss, peak = _rss_mb()
    _faiss_threads(1)  # as on the router's encoder thread
    times, top = _time_searches(index, queries)
    p50, p99 = _percentiles(times)
    swap = _measure_swaps(index, real, bounds, queries, total, opts)
    return {
        "vectors": int(total),
        "index_type": index_type,
        "index_params": params,
        "build_seconds": round(train_seconds + add_seconds, 2),
        "rss_mb": rss,
        "rss_baseline_mb": baseline,
        "rss_index_mb": round(rss - baseline, 1),
        "rss_peak_mb": peak,
        "search_p50_ms": p50,
        "search_p99_ms": p99,
        "top1_agreement": round(float(np.mean(top == exact_id)), 4),
        "top1_participant_agreement": round(
            float(np.mean(_participant_of(top, bounds, len(real)) == _participant_of(exact_id, bounds, len(real)))), 4
        ),
        "queries": len(queries),
        **swap,
    }


def _faiss_threads(count: int) -> None:
    import faiss  # see the note on faiss above

    faiss.omp_set_num_threads(count)


def _new_index(real: np.ndarray, bounds: np.ndarray, total: int, seed: int):
    """The router's index for `total` vectors, empty: (index, its type, its parameters, training seconds).
    An IVF index is trained on the real phrases and synthetic ones, 40 per list."""
    from mbc.runtime.index import EXACT_MAX_VECTORS, FlatIndex, IVFIndex, ivf_lists  # loads faiss: see above

    if total < EXACT_MAX_VECTORS:
        return FlatIndex(real.shape[1]), "exact", {}, 0.0
    nlist = ivf_lists(total)
    sample = np.concatenate([real, synthetic_participants(real, bounds, 0, max(1, 40 * nlist // PHRASES_PER_PARTICIPANT), seed)])
    started = time.perf_counter()
    index = IVFIndex(real.shape[1], sample, nlist=nlist)
    return index, "ivf-pq4fs+fp16-rerank", {"nlist": index.nlist, "nprobe": index.nprobe}, time.perf_counter() - started


def _fill(index, real: np.ndarray, bounds: np.ndarray, queries: np.ndarray, total: int, seed: int) -> tuple[float, np.ndarray]:
    """Adds every vector, chunk by chunk; returns the seconds spent adding and each query's exact
    first result (computed on the same chunks, never holding them all in float32)."""
    exact_id = np.full(len(queries), -1, np.int64)
    exact_score = np.full(len(queries), -np.inf, np.float32)
    seconds = 0.0
    for start, vectors in _chunks(real, bounds, total, seed):
        ids = np.arange(start, start + len(vectors), dtype=np.int64)
        started = time.perf_counter()
        index.add(ids, vectors)
        seconds += time.perf_counter() - started
        scores = queries @ vectors.T
        best = scores.argmax(axis=1)
        score = scores[np.arange(len(queries)), best]
        better = score > exact_score
        exact_id[better], exact_score[better] = best[better] + start, score[better]
        del vectors, scores
    return seconds, exact_id


def _time_searches(index, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Seconds of each query's search (after 20 unmeasured ones), and each query's first result."""
    for q in queries[:20]:
        index.search(q[None], NEIGHBOURS)
    times, top = [], np.empty(len(queries), np.int64)
    for i, q in enumerate(queries):
        started = time.perf_counter()
        _, ids = index.search(q[None], NEIGHBOURS)
        times.append(time.perf_counter() - started)
        top[i] = ids[0, 0]
    return times, top


def _participant_of(ids: np.ndarray, bounds: np.ndarray, real: int) -> np.ndarray:
    """Synthetic participants by number, real domains (15 intents each) as negative numbers; `real`
    is the number of real phrases (ids below it)."""
    domain = (np.searchsorted(bounds[:, 0], ids, side="right") - 1) // 15
    return np.where(ids < real, -1 - domain, (ids - real) // PHRASES_PER_PARTICIPANT)


class _Searcher(threading.Thread):
    """Searches without pause, as a stream of Matches would, and sees replacements itself: while a
    `probe` (a new vector, its id) is set, its searches ask for it until it is found, then `seen` is
    set (a second thread polling would compete with the measured searches for the cores, which the
    replacement does not). Search times go to `times[phase]`."""

    def __init__(self, index, queries: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.index, self.queries = index, queries
        self.times: list[list[float]] = [[], []]
        self.phase = 0
        self.probe: tuple[np.ndarray, int] | None = None
        self.seen = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        _faiss_threads(1)  # as on the router's encoder thread
        i = 0
        while not self.stopping.is_set():
            asked = self.probe
            started = time.perf_counter()
            _, found = self.index.search(asked[0][None] if asked else self.queries[i % len(self.queries)][None], NEIGHBOURS)
            self.times[self.phase].append(time.perf_counter() - started)
            if asked and asked[1] in found[0]:
                self.probe = None
                self.seen.set()
            i += 1


def _measure_swaps(index, real: np.ndarray, bounds: np.ndarray, queries: np.ndarray, total: int, opts: IndexBenchOptions) -> dict:
    """A `_Searcher` searches for 3 s (the steady phase), then, while it goes on, participants are
    replaced one after another; each replacement is timed until the searcher finds its new phrases."""
    synthetic = (total - len(real)) // PHRASES_PER_PARTICIPANT
    if synthetic < 1 or opts.swaps < 1:
        return {"swap_visible_ms": None, "swap_search_p99_ms": None, "steady_search_p99_ms": None, "swaps": 0}
    rng = np.random.default_rng(opts.seed + 1)
    # The replacements are made up front: generating them is the bench's work, not the router's.
    replacements = [
        (int(rng.integers(synthetic)), synthetic_participants(real, bounds, 10_000_000 + n, 1, opts.seed))
        for n in range(opts.swaps)
    ]
    searcher = _Searcher(index, queries)
    searcher.start()
    time.sleep(3.0)
    searcher.phase = 1
    visible = [_replace(index, searcher, len(real) + p * PHRASES_PER_PARTICIPANT, fresh) for p, fresh in replacements]
    searcher.stopping.set()
    searcher.join(timeout=30)
    return {
        "swap_visible_ms": round(max(visible) * 1000, 2),
        "swap_search_p99_ms": _percentiles(searcher.times[1])[1],
        "steady_search_p99_ms": _percentiles(searcher.times[0])[1],
        "swaps": opts.swaps,
    }


def _replace(index, searcher: _Searcher, first: int, fresh: np.ndarray) -> float:
    """Replaces the participant whose ids start at `first` by `fresh`: seconds until `searcher` finds it."""
    ids = np.arange(first, first + PHRASES_PER_PARTICIPANT, dtype=np.int64)
    searcher.seen.clear()
    started = time.perf_counter()
    index.remove(ids)
    index.add(ids, fresh)
    searcher.probe = (fresh[0], int(ids[0]))
    if not searcher.seen.wait(timeout=30):
        raise RuntimeError("a replaced participant never became visible")
    visible = time.perf_counter() - started
    time.sleep(0.05)
    return visible


def _router_texts(phrases: int) -> list[str]:
    return [f"bench phrase {i} of participant {i // PHRASES_PER_PARTICIPANT}" for i in range(phrases)]


def seed_router_cache(directory: str, model_id: str, phrases: int, real: np.ndarray, intents: np.ndarray, seed: int) -> None:
    """The persisted embeddings a restarted router finds: synthetic vectors for `_router_texts`."""
    count = (phrases + PHRASES_PER_PARTICIPANT - 1) // PHRASES_PER_PARTICIPANT
    store = EmbeddingStore(directory)
    store.put_many(model_id, _router_texts(phrases), synthetic_participants(real, intents, 20_000_000, count, seed)[:phrases])
    store.close()


def _router_participant(number: int, intent: str, said: list[str]) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        bot_id=f"bot{number}",
        instance_id="i1",
        address="127.0.0.1:9",
        group="bench",
        collaboration=True,
        intents=[participant_pb2.Intent(name=intent, phrases=said)],
    )


def measure_router(directory: str, phrases: int, backend: str) -> dict:
    """In a process of its own: the encoder, then the router (`RouterCore`) restarted on the
    cache `seed_router_cache` filled, with one group of `phrases` phrases; then one of its
    participants replaced. `router_rss_mb` is this process's RSS once the router is ready."""
    texts = _router_texts(phrases)
    snapshot = {
        f"/mbc/v1/participants/bench/bot{n}/i1": _router_participant(n, "intent", texts[start : start + PHRASES_PER_PARTICIPANT])
        for n, start in enumerate(range(0, phrases, PHRASES_PER_PARTICIPANT))
    }
    del texts
    encoder = Encoder(EncoderConfig(backend=backend))
    try:
        encoder.encode(["warm up"])
        baseline = _rss_mb()[0]
        return asyncio.run(_restart_router(directory, phrases, snapshot, encoder, baseline))
    finally:
        encoder.close()


async def _restart_router(directory: str, phrases: int, snapshot: dict, encoder: Encoder, baseline: float) -> dict:
    """A router on the persisted cache in `directory`, given `snapshot` (`phrases` phrases): the
    seconds until it is ready, its RSS then (`baseline`: before it), and how long a replaced
    participant takes to be answered."""
    from router.core import RouterCore  # loads faiss: see above

    started = time.perf_counter()
    core = RouterCore(RouterConfig(embedding_cache_dir=directory), encoder)
    try:
        await core.prepare()
        generic = core.embeddings.encoded  # the built-in generic set, not in this synthetic cache
        core.submit(snapshot, 1)
        await core.wait_ready()
        ready = time.perf_counter() - started
        encoded = core.embeddings.encoded - generic
        gc.collect()
        rss, peak = _rss_mb()
        visible = await _swap_visible(core, snapshot)
        model = core.models["bench"]
        return {
            "restart_phrases": phrases,
            "restart_ready_seconds": round(ready, 2),
            "restart_encoded": encoded,
            "router_rss_mb": rss,
            "router_rss_baseline_mb": baseline,
            "router_rss_peak_mb": peak,
            "router_swap_visible_ms": round(visible * 1000, 1),
            "router_large_group": model.large,
            "router_swap_index_s": model.times.as_dict()["index_s"],
            "router_swap_calibrate_s": model.times.as_dict()["calibrate_s"],
        }
    finally:
        await core.close()


async def _swap_visible(core, snapshot: dict) -> float:
    """bot0 registers again with 100 new phrases (the model embeds them, as in a real change): the
    seconds until Match answers one of them with its new intent."""
    replaced = [f"the replacement participant's phrase number {i}" for i in range(PHRASES_PER_PARTICIPANT)]
    changed = time.perf_counter()
    core.submit({**snapshot, "/mbc/v1/participants/bench/bot0/i1": _router_participant(0, "replaced", replaced)}, 2)
    while True:
        result = await core.match(replaced[-1], "", "bench", 1, 0)
        if result.candidates and result.candidates[0].match.intent == "replaced":
            return time.perf_counter() - changed
        await asyncio.sleep(0.001)


def _clinc_vectors(
    encoder, data_dir: Path, opts: IndexBenchOptions, cache: str
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Real phrase vectors (the 10-bot mesh), query vectors (distinct val utterances), intent rows."""
    domains, train, val, _ = load_clinc(data_dir)
    phrases: list[str] = []
    intents = []
    for _domain, names in sorted(domains.items())[: opts.domains or None]:
        for name in sorted(names):
            intents.append((len(phrases), len(phrases) + len(train[name])))
            phrases.extend(train[name])
    rng = np.random.default_rng(opts.seed)
    picked = [val[i] for i in sorted(rng.choice(len(val), min(opts.queries, len(val)), replace=False))]
    embeddings = PhraseEmbeddings(encoder, open_store(cache))
    real = asyncio.run(embeddings.embed(phrases))
    query_vectors = asyncio.run(embeddings.embed(picked))
    if embeddings.store is not None:
        embeddings.store.close()
    return real, query_vectors, intents


def run(opts: IndexBenchOptions, data_dir: Path, backend: str, cache: str) -> dict:
    """Embed the CLINC150 phrases and queries, measure the index, then the restarted router, each in
    a process of its own, and report."""
    load = os.getloadavg()
    encoder = Encoder(EncoderConfig(backend=backend))
    try:
        real, queries, intents = _clinc_vectors(encoder, data_dir, opts, cache)
        with tempfile.TemporaryDirectory(prefix="mbc-bench-index-") as work:
            real_path, queries_path = os.path.join(work, "real.npy"), os.path.join(work, "queries.npy")
            np.save(real_path, real)
            np.save(queries_path, queries)
            result = _in_new_process(measure_index, real_path, queries_path, intents, opts)
            seed_router_cache(work, encoder.model_id, opts.restart_phrases, real, np.asarray(intents), opts.seed)
            result.update(_in_new_process(measure_router, work, opts.restart_phrases, backend))
    finally:
        encoder.close()
    result["load_average"] = {"start": [round(x, 2) for x in load], "end": [round(x, 2) for x in os.getloadavg()]}
    result["machine"] = {"cpus": os.cpu_count(), "encoder_backend": backend}
    result["options"] = asdict(opts)
    return result


def _in_new_process(function, *args):
    """function(*args) in a spawned process: its memory holds only what the function measures."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def print_table(result: dict) -> None:
    rows = [
        ("vectors", result["vectors"]),
        ("index_type", result["index_type"]),
        ("index_params", result["index_params"]),
        ("build_seconds", result["build_seconds"]),
        ("rss_mb (index process; baseline, peak)", f"{result['rss_mb']} ({result['rss_baseline_mb']}, {result['rss_peak_mb']})"),
        ("search_p50_ms / search_p99_ms", f"{result['search_p50_ms']} / {result['search_p99_ms']}"),
        (
            "top1_agreement (id; participant)",
            f"{result['top1_agreement']}; {result['top1_participant_agreement']} over {result['queries']} queries",
        ),
        ("swap_visible_ms (slowest of swaps)", f"{result['swap_visible_ms']} ({result['swaps']})"),
        ("swap_search_p99_ms / steady_search_p99_ms", f"{result['swap_search_p99_ms']} / {result['steady_search_p99_ms']}"),
        (
            "restart_ready_seconds (phrases; encoded)",
            f"{result['restart_ready_seconds']} ({result['restart_phrases']}; {result['restart_encoded']})",
        ),
        (
            "router_rss_mb (model loaded; peak)",
            f"{result['router_rss_mb']} ({result['router_rss_baseline_mb']}; {result['router_rss_peak_mb']})",
        ),
        ("router_swap_visible_ms (same group)", result["router_swap_visible_ms"]),
        ("load average start → end", f"{result['load_average']['start']} → {result['load_average']['end']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = IndexBenchOptions()
    parser.add_argument(
        "--vectors", type=int, default=defaults.vectors, help="vectors in the index (real CLINC150 phrases + synthetic)"
    )
    parser.add_argument("--queries", type=int, default=defaults.queries, help="CLINC150 val utterances searched")
    parser.add_argument("--swaps", type=int, default=defaults.swaps, help="participants of 100 phrases replaced under search")
    parser.add_argument(
        "--restart-phrases", type=int, default=defaults.restart_phrases, help="cached phrases of the restart measurement"
    )
    parser.add_argument("--domains", type=int, default=defaults.domains, help="real CLINC150 domains (bots) indexed; 0: all 10")
    parser.add_argument("--json", default="", metavar="OUT", help="write the figures as JSON")
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="CLINC150 directory")
    parser.add_argument(
        "--backend", default="onnx", choices=("torch", "onnx", "onnx-int8"), help="encoder backend for the real vectors"
    )
    parser.add_argument(
        "--embedding-cache",
        default="",
        metavar="DIR",
        help='persisted embeddings of the CLINC150 texts (default ~/.cache/mbc/embeddings; "off": none)',
    )


def main(args: argparse.Namespace) -> int:
    if args.vectors < 1 or args.queries < 1 or args.swaps < 0 or args.restart_phrases < 1 or not 0 <= args.domains <= 10:
        print(
            "mbc bench index: --vectors, --queries and --restart-phrases must be positive, --swaps not negative, "
            "--domains between 0 and 10",
            file=sys.stderr,
        )
        return 2
    opts = IndexBenchOptions(args.vectors, args.queries, args.swaps, args.restart_phrases, args.domains)
    result = run(opts, args.data, args.backend, args.embedding_cache)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
