"""Trained group heads persisted on disk, so a restarted router does not train again.

Training a group's logistic-regression and SVM heads and fitting τ takes time that grows with the
group (phrases × intents): seconds for the 10-bot CLINC150 mesh, minutes for groups of 100,000
phrases, and the router answers UNAVAILABLE until its first models are built. The phrase vectors
are persisted already (router/embedding_store.py); this keeps what was trained from them.

One `.npz` file per trained state, named by a digest of everything training reads: the embedding
model, the decision settings, the group's intents with their phrases, the calibration examples,
the generic out-of-scope set and the group's own decision costs (τ is stored with the heads).
Heads are always trained from scratch with fixed seeds (router/core.py), so a file found holds
what training would give again: a router with a warm cache decides like one with an empty cache.
Files hold arrays and one JSON document (no pickle: loading a cache file never runs code), are
written to a temporary name and renamed (a crash leaves the previous content), and the oldest are
deleted past `MAX_FILES` or `MAX_BYTES`. A file that cannot be read is removed with a warning and the heads are
trained again: the cache never stops a router.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mbc.runtime.config import DecisionConfig
from mbc.runtime.files import temporary_beside
from mbc.runtime.logs import get_logger
from mbc.runtime.matching import IntentPhrases
from router.calibration import CalibrationInput
from router.decision import Heads, LexicalSvm

log = get_logger(__name__)

FORMAT = "mbc-heads-5"
"""Bump when what is stored, or how the heads are trained, changes: older files are then misses."""
MAX_FILES = 1024
"""Files kept, most recently used first: one per group (and calibration set) in use, and a mesh
may have hundreds of groups ..."""
MAX_BYTES = 1 << 30
"""... within this many bytes: the SVM heads are dense (44 MB, float32, for the 15,000 phrases and
150 intents of the CLINC150 mesh)."""
SVM_PREFIXES = ("svm_", "char_svm_")
"""The archive entries of `Heads.svm` and `Heads.char_svm` start with these."""
DIRECTORY = "models"
"""Beside the embeddings file, in the same cache directory."""


def heads_key(model_id: str, config: DecisionConfig, intents: Sequence[IntentPhrases], calibration: CalibrationInput) -> str:
    """The digest of every input of training (see the module docstring)."""
    digest = hashlib.sha256()
    for part in (
        FORMAT,
        model_id,
        json.dumps(asdict(config), sort_keys=True),
        json.dumps(sorted([i.bot_id, i.intent, list(i.phrases)] for i in intents)),
        json.dumps([[e.text, e.bot_id, e.intent, e.group] for e in calibration.examples]),
        json.dumps(list(calibration.generic)),
        json.dumps(sorted(calibration.costs.items())),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def heads_to_bytes(heads: Heads) -> bytes:
    """`heads` as an .npz archive: arrays and one JSON document (what the cache files and the
    replicas' `RouterPeers.GetHeads` carry)."""
    meta = {"format": FORMAT, "classes": [list(c) for c in heads.classes], "tau": heads.tau, "calibration": heads.calibration}
    arrays = {"W": heads.W, "b": heads.b}
    for prefix, svm in zip(SVM_PREFIXES, (heads.svm, heads.char_svm)):
        vocabulary, svm_arrays = svm.state() if svm is not None else (None, {})
        meta[f"{prefix}vocabulary"] = vocabulary
        meta[f"{prefix}analyzer"] = svm.analyzer if svm is not None else None
        arrays.update({f"{prefix}{name}": value for name, value in svm_arrays.items()})
    out = io.BytesIO()
    # allow_pickle: numpy's default, given so that mypy does not match **arrays against it.
    np.savez(out, allow_pickle=True, meta=np.array(json.dumps(meta, default=float)), **arrays)
    return out.getvalue()


def _svm_from(meta: dict, arrays, prefix: str) -> LexicalSvm | None:
    """The lexical SVM stored under `prefix`, or None where there was none."""
    if meta[f"{prefix}vocabulary"] is None:
        return None
    idf, weights, intercept, classes = (arrays[f"{prefix}{name}"] for name in ("idf", "weights", "intercept", "classes"))
    return LexicalSvm(meta[f"{prefix}vocabulary"], idf, weights, intercept, classes, meta[f"{prefix}analyzer"])


def heads_from_bytes(data: bytes) -> Heads | None:
    """The heads `heads_to_bytes` wrote; None for another format (an older release's); ValueError
    saying why for bytes that are not such an archive. Never unpickles."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            if meta["format"] != FORMAT:
                return None
            svm, char_svm = (_svm_from(meta, arrays, prefix) for prefix in SVM_PREFIXES)
            classes = [tuple(c) for c in meta["classes"]]
            return Heads(classes, arrays["W"], arrays["b"], svm, float(meta["tau"]), meta["calibration"], char_svm)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise ValueError(f"not a heads archive: {e}") from e


class HeadsCache:
    """Trained heads by `heads_key`, in a directory; thread-safe, shared safely by several routers."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> Heads | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            heads = heads_from_bytes(path.read_bytes())
        except (OSError, ValueError) as e:
            log.warning("heads_cache_unreadable", path=str(path), error=str(e), action="removed, training again")
            path.unlink(missing_ok=True)
            return None
        if heads is not None:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: kept longest
        return heads

    def save(self, key: str, heads: Heads) -> None:
        path = self._path(key)
        tmp = temporary_beside(path)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(heads_to_bytes(heads))
            os.replace(tmp, path)
            self._prune()
        except OSError as e:
            log.warning("heads_cache_not_written", path=str(path), error=str(e))
            tmp.unlink(missing_ok=True)

    def _prune(self) -> None:
        with self._lock:
            files = []
            for path in self.directory.glob("*.npz"):
                try:
                    files.append((path.stat(), path))
                except OSError:  # removed by another router meanwhile
                    continue
            files.sort(key=lambda f: -f[0].st_mtime)
            total = 0
            for n, (stat, path) in enumerate(files):
                total += stat.st_size
                if n >= MAX_FILES or (n and total > MAX_BYTES):
                    path.unlink(missing_ok=True)
