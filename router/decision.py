"""How the nearest phrases of an utterance become a routing decision: one `GroupModel` per group.

A group model is computed from the intents its participants registered (and an optional labelled
calibration set) whenever they change, in a worker thread, and swapped in whole:

- the FAISS index of every phrase (`IntentCatalog`): the k nearest phrases of an utterance name the
  candidate intents, and give two features per candidate: the best cosine (shown to people as
  `Candidate.score`) and the mean of its top-5 neighbour similarities (`knn`);
- a multinomial logistic-regression head over the embeddings (`lr`, the raw logit), trained with
  full-batch L-BFGS, warm-started from the previous model's weights of the intents that remain;
- two TF-IDF linear SVMs over the phrase texts, one by words (1-2 grams, `svm`) and one by
  characters within words (2-5 grams, `char`: what a typo or an inflection leaves of a word), their
  decision values.

The fused score of a candidate is `lr + svm_weight·svm + char_svm_weight·char + knn_weight·knn`
(`Candidate.confidence`).
A large group (`DecisionConfig.heads_max_phrases`) has no heads: its score is
`knn_weight·knn + centroid_weight·centroid`, the second the cosine of the utterance with the mean of
the intent's phrase vectors; both depend on an intent's own phrases only, so a participant change
updates the model in place (`GroupModel.updated`) instead of training it again.
A threshold τ is fitted per group (see router/calibration.py); the rating of a candidate follows
from its confidence relative to τ, and the decision (act, disambiguate, none) from the ratings and
the gap between the best two bots.
"""

from __future__ import annotations

import copy
import itertools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from mbc.runtime.config import DecisionConfig
from mbc.runtime.logs import get_logger
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import common_pb2, router_pb2

log = get_logger(__name__)

VERY_GOOD = common_pb2.RATING_VERY_GOOD
GOOD = common_pb2.RATING_GOOD
FAIR_PLUS = common_pb2.RATING_FAIR_PLUS
FAIR = common_pb2.RATING_FAIR
POOR = common_pb2.RATING_POOR

ACT = router_pb2.DECISION_ACT
DISAMBIGUATE = router_pb2.DECISION_DISAMBIGUATE
NONE = router_pb2.DECISION_NONE


@dataclass(frozen=True)
class Scored:
    """One candidate intent for one utterance."""

    bot_id: str
    intent: str
    confidence: float
    """Fused score (lr + svm + char + knn)."""
    score: float
    """Cosine similarity of the best phrase of the intent."""
    matched_phrase: str
    rating: int = POOR


@dataclass(frozen=True)
class Verdict:
    decision: router_pb2.Decision
    candidates: list[Scored]
    """Best first. With DISAMBIGUATE: the best intent of each of the 2-3 close bots, the options."""


def decide(ranked: Sequence[Scored], margin: float) -> Verdict:
    """The decision over candidates already rated and sorted best first (one group).

    DISAMBIGUATE when the best intents of two or three different bots are within `margin` of the
    first (fused score) and all at least FAIR PLUS; otherwise ACT when the first is GOOD or
    better; otherwise NONE.
    """
    if not ranked:
        return Verdict(NONE, [])
    best_per_bot: list[Scored] = []
    for c in ranked:
        if all(c.bot_id != b.bot_id for b in best_per_bot):
            best_per_bot.append(c)
    top = ranked[0]
    if margin > 0 and len(best_per_bot) >= 2:
        close = [b for b in best_per_bot[:3] if b.rating >= FAIR_PLUS and top.confidence - b.confidence <= margin]
        if len(close) >= 2 and close[0] is top:
            return Verdict(DISAMBIGUATE, close)
    if top.rating >= GOOD:
        return Verdict(ACT, list(ranked))
    return Verdict(NONE, list(ranked))


_TOKEN = re.compile(r"(?u)\b\w\w+\b")
"""sklearn's default `token_pattern`."""


def _word_1_2_grams(text: str) -> list[str]:
    """The terms sklearn's `TfidfVectorizer(ngram_range=(1, 2)).build_analyzer()` gives (lower
    case, its token pattern, the words then the pairs of neighbours joined by a space), without
    importing sklearn."""
    words = _TOKEN.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _char_wb_2_5_grams_of_word(word: str) -> list[str]:
    """sklearn's `char_wb` terms (2-5) of one word: padded with a space each side, its 2- to
    5-character n-grams, a word no longer than n counted once."""
    w = f" {word} "
    grams: list[str] = []
    for n in range(2, 6):
        grams.extend(w[i : i + n] for i in range(max(len(w) - n, 0) + 1))
        if len(w) <= n:
            break
    return grams


class Analyzer(NamedTuple):
    """How a kind of lexical SVM reads a text."""

    parts: Callable[[str], list[str]]
    """The text cut into parts whose terms do not depend on one another."""
    terms: Callable[[str], list[str]]
    """The terms of one part."""
    cached: bool
    """Parts recur (words do; whole utterances seldom): their term ids are kept."""


ANALYZERS: dict[str, Analyzer] = {
    "word": Analyzer(lambda text: [text], _word_1_2_grams, cached=False),
    "char_wb": Analyzer(lambda text: text.lower().split(), _char_wb_2_5_grams_of_word, cached=True),
}
"""Per kind of lexical SVM, by the name persisted with its head: word pairs need the whole text;
character n-grams stay within a word."""
SCORE_CHUNK = 256
"""Texts scored in one product: the product's matrix is texts × their distinct terms, dense."""
_VECTORIZER_ARGS: dict[str, dict[str, Any]] = {
    "word": {"ngram_range": (1, 2)},
    "char_wb": {"analyzer": "char_wb", "ngram_range": (2, 5)},
}
PART_CACHE_SIZE = 20_000
"""Parts (words, for character n-grams) whose term ids a lexical SVM keeps: an utterance's words
mostly came before, and cutting a word into n-grams in Python costs more than scoring them."""


def analyze(analyzer: str, text: str) -> list[str]:
    """The terms of `text` for a lexical SVM of kind `analyzer`: those of sklearn's
    `TfidfVectorizer` with `LexicalSvm._vectorizer`'s arguments, without importing sklearn
    (tests/test_encoder_speed.py checks they are equal)."""
    reading = ANALYZERS[analyzer]
    return [term for part in reading.parts(text) for term in reading.terms(part)]


class LexicalSvm:
    """A TF-IDF (sublinear tf) linear SVM over phrase texts, by words (1-2 grams, `analyzer="word"`)
    or by characters within words (2-5 grams, `"char_wb"`: spelling variants, inflections and typos
    share most of their n-grams where they share no word).

    Scoring does sklearn's arithmetic (`TfidfVectorizer.transform` then `LinearSVC.decision_function`,
    the same values to float32's precision) without its per-call input validation, which costs more than the
    arithmetic for a micro-batch of short utterances (4 ms a call against 0.1 ms), for a whole
    micro-batch at once."""

    @staticmethod
    def _vectorizer(analyzer: str):
        """What `fit` uses; scoring analyses texts with `analyze`, the same terms without
        importing sklearn (seconds on a loaded machine: heads restored from their cache need none)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(sublinear_tf=True, **_VECTORIZER_ARGS[analyzer])

    @classmethod
    def fit(cls, texts: Sequence[str], labels: np.ndarray, analyzer: str = "word") -> LexicalSvm:
        from sklearn.svm import LinearSVC

        vectorizer = cls._vectorizer(analyzer)
        # A fixed seed: liblinear shuffles with it, and replicas must train the same head.
        svm = LinearSVC(C=1.0, random_state=0).fit(vectorizer.fit_transform(texts), labels)
        return cls(vectorizer.vocabulary_, vectorizer.idf_, svm.coef_.T, svm.intercept_, svm.classes_, analyzer)

    def __init__(self, vocabulary: dict[str, int], idf, weights, intercept, classes, analyzer: str = "word") -> None:
        """From a fitted `TfidfVectorizer` (vocabulary, idf) and the `LinearSVC` fitted on its output
        (weights: one row per n-gram, intercept, classes); `analyzer`: a name of `ANALYZERS`."""
        if analyzer not in ANALYZERS:
            raise ValueError(f"unknown lexical analyzer {analyzer!r} (one of {sorted(ANALYZERS)})")
        self.analyzer = analyzer
        self._reading = ANALYZERS[analyzer]
        self._part_ids: dict[str, list[int]] = {}
        """Term ids of the parts seen, at most `PART_CACHE_SIZE` (a lost race computes one twice)."""
        self._vocabulary = {str(term): int(i) for term, i in vocabulary.items()}
        self._idf = np.asarray(idf, np.float64)
        self._weights = np.ascontiguousarray(weights, np.float32)
        """float32, as the fused score is: half the memory and the bytes a Match reads (a
        group's weights are n-grams × intents, and the rows a Match reads are scattered)."""
        self._intercept = np.asarray(intercept, np.float64)
        self.classes = np.asarray(classes, dtype=np.int64)
        """The label of each column of `decision_function`."""

    def state(self) -> tuple[dict[str, int], dict[str, np.ndarray]]:
        """(vocabulary, arrays): with `analyzer`, what the constructor takes, to persist without pickle."""
        return self._vocabulary, {
            "idf": self._idf,
            "weights": self._weights,
            "intercept": self._intercept,
            "classes": self.classes,
        }

    def _term_ids(self, text: str) -> list[int]:
        """The vocabulary ids of `text`'s terms, in order, repeats kept (unknown terms dropped)."""
        out: list[int] = []
        reading, vocabulary = self._reading, self._vocabulary
        cache = self._part_ids if reading.cached else {}
        for part in reading.parts(text):
            ids = cache.get(part)
            if ids is None:
                ids = [i for i in map(vocabulary.get, reading.terms(part)) if i is not None]
                if reading.cached and len(cache) < PART_CACHE_SIZE:
                    cache[part] = ids
            out.extend(ids)
        return out

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), len(classes)) decision values."""
        if len(texts) > SCORE_CHUNK:
            return np.concatenate([self.decision_function(texts[i : i + SCORE_CHUNK]) for i in range(0, len(texts), SCORE_CHUNK)])
        out = np.zeros((len(texts), self._weights.shape[1]), np.float64)
        ids_of = [self._term_ids(text) for text in texts]
        lengths = np.fromiter(map(len, ids_of), np.int64, len(texts))
        if lengths.any():
            # Each (text, term) once with its count: the texts' term ids, keyed by text then id.
            keys = np.repeat(np.arange(len(texts), dtype=np.int64), lengths) * len(self._idf)
            keys += np.fromiter(itertools.chain.from_iterable(ids_of), np.int64, int(lengths.sum()))
            keys, counts = np.unique(keys, return_counts=True)
            rows, ids = np.divmod(keys, len(self._idf))
            tfidf = (np.log(counts) + 1.0) * self._idf[ids]
            tfidf /= np.sqrt(np.bincount(rows, tfidf * tfidf))[rows]
            terms, column = np.unique(ids, return_inverse=True)
            matrix = np.zeros((len(texts), len(terms)), np.float32)
            matrix[rows, column] = tfidf
            out += matrix @ self._weights[terms]
        out += self._intercept
        if len(self.classes) == 2:  # two classes: sklearn gives one value, for the second
            out = np.concatenate([-out, out], axis=1)
        return out


def _centroids(vectors: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """The normalised mean of each run of `counts` consecutive rows."""
    out = np.zeros((len(counts), vectors.shape[1]), np.float32)
    starts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    full = np.asarray(counts) > 0
    if full.any():
        out[full] = np.add.reduceat(np.asarray(vectors, np.float32), starts[full], axis=0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def changed_bots(before: Sequence[IntentPhrases], after: Sequence[IntentPhrases]) -> dict[str, tuple[IntentPhrases, ...]]:
    """The bots whose intents differ from `before` to `after`, with their intents in `after`
    (none: the bot left). Compared as lists: unchanged intents are the same objects (the router's
    directory keeps them), which the comparison recognises without reading their phrases."""

    def by_bot(entries: Sequence[IntentPhrases]) -> dict[str, list[IntentPhrases]]:
        out: dict[str, list[IntentPhrases]] = {}
        for e in entries:
            out.setdefault(e.bot_id, []).append(e)
        return out

    old, new = by_bot(before), by_bot(after)
    return {b: tuple(new.get(b, ())) for b in sorted(old.keys() | new.keys()) if old.get(b) != new.get(b)}


@dataclass
class TrainTimes:
    embed: float = 0.0
    index: float = 0.0
    lr: float = 0.0
    svm: float = 0.0
    calibrate: float = 0.0
    lr_iterations: int = 0
    warm_started: bool = False

    def total(self) -> float:
        return self.index + self.lr + self.svm + self.calibrate

    def as_dict(self) -> dict:
        return {
            "index_s": round(self.index, 3),
            "lr_s": round(self.lr, 3),
            "svm_s": round(self.svm, 3),
            "calibrate_s": round(self.calibrate, 3),
            "lr_iterations": self.lr_iterations,
            "warm_started": self.warm_started,
        }


@dataclass
class Features:
    """Per query row: candidate class ids and their features (ragged, as flat arrays)."""

    query: np.ndarray  # row of each entry
    cls: np.ndarray  # class id of each entry
    cosine: np.ndarray  # best similarity of the class among the neighbours
    best_row: np.ndarray  # catalog row of that best phrase
    fused: np.ndarray
    rank_key: np.ndarray  # what candidates are ranked by, best first: a registered phrase, the bot's score, then `fused`


@dataclass
class Heads:
    """The trained part of a `GroupModel`: logistic-regression and SVM heads, and τ."""

    classes: list[tuple[str, str]]
    W: np.ndarray
    b: np.ndarray
    svm: LexicalSvm | None
    tau: float
    calibration: dict
    char_svm: LexicalSvm | None = None
    """The character n-gram SVM (`DecisionConfig.char_svm_weight` above 0)."""


class GroupModel:
    """Everything the router computes from a group's intents. Immutable once built."""

    def __init__(
        self,
        intents: Sequence[IntentPhrases],
        vectors: np.ndarray,
        dim: int,
        config: DecisionConfig,
        previous: GroupModel | None = None,
        heads: Heads | None = None,
        heads_free: bool = False,
    ) -> None:
        """Trains the heads (warm-started from `previous`), or takes `heads` trained earlier on the
        same intents and phrases (a restarted router); `heads_free`: none, scored like a large
        group (a new group's first model, served while its heads train)."""
        self.config = config
        self.times = TrainTimes()
        t0 = time.perf_counter()
        self.catalog = IntentCatalog(intents, vectors, dim)
        entries = sorted(intents, key=lambda e: (e.bot_id, e.intent))
        self.classes: list[tuple[str, str]] = [(e.bot_id, e.intent) for e in entries]
        self.class_of = {key: i for i, key in enumerate(self.classes)}
        self.bot_of_class = [b for b, _ in self.classes]
        self.row_class = (
            np.concatenate([np.full(len(e.phrases), i, dtype=np.int64) for i, e in enumerate(entries)])
            if entries
            else np.zeros(0, np.int64)
        )
        self.texts = IntentCatalog.phrases_of(intents)
        self.large = heads_free or len(self.texts) >= config.heads_max_phrases
        """No heads: scored by the nearest phrases and the centroids, and updated in place (`updated`)."""
        self.vectors = None if self.large else vectors
        """The phrase vectors, in `texts` order, for cross-fitting τ (large groups do not keep them)."""
        self.centroids = _centroids(vectors, [len(e.phrases) for e in entries]) if self.large else None
        """Large groups: the normalised mean phrase vector of each class."""
        self.bots = sorted({b for b, _ in self.classes})
        self.times.index = time.perf_counter() - t0
        self.tau = 0.0
        self.calibration: dict = {}
        """How τ was fitted (method, counts, figures on the calibration set)."""
        n = len(self.classes)
        self.W = np.zeros((dim, n), np.float32)
        self.b = np.zeros(n, np.float32)
        self._svm: LexicalSvm | None = None
        self._char_svm: LexicalSvm | None = None
        if heads is not None:
            if heads.classes != self.classes:
                raise ValueError("the heads were trained for other intents")
            self.W, self.b, self._svm, self._char_svm = heads.W, heads.b, heads.svm, heads.char_svm
            self.tau, self.calibration = heads.tau, dict(heads.calibration)
        elif n >= 2 and not self.large:
            t = time.perf_counter()
            self._train_lr(vectors, previous)
            self.times.lr = time.perf_counter() - t
            t = time.perf_counter()
            self._svm = LexicalSvm.fit(self.texts, self.row_class)
            if config.char_svm_weight:
                self._char_svm = LexicalSvm.fit(self.texts, self.row_class, analyzer="char_wb")
            self.times.svm = time.perf_counter() - t

    def heads(self) -> Heads:
        """What training and calibration produced, to persist (see router/model_cache.py)."""
        return Heads(list(self.classes), self.W, self.b, self._svm, self.tau, dict(self.calibration), self._char_svm)

    def updated(self, changed: Mapping[str, Sequence[IntentPhrases]], vectors: np.ndarray) -> GroupModel:
        """This large group's model after the bots of `changed` replaced their intents (an empty
        sequence: the bot left), without building anew: the index is updated in place and shared
        with this model, which may still be serving. `vectors`: a row per phrase of
        `IntentCatalog.phrases_of` the changed intents. τ is left to fit (router/calibration.py).

        Readers never block, and never see a phrase they cannot name: the class tables only grow,
        and grow before the index does; a model reads `row_class` once per search and ignores ids
        beyond it (the phrases added after it was made). Removed rows keep their entries."""
        if not self.large:
            raise ValueError("only a large group's model is updated in place")
        assert self.centroids is not None  # a large group's model always has its centroids (__init__)
        t0 = time.perf_counter()
        added = sorted((e for entries in changed.values() for e in entries), key=lambda e: (e.bot_id, e.intent))
        other = copy.copy(self)
        other.times = TrainTimes()
        for e in added:
            if (e.bot_id, e.intent) not in self.class_of:
                self.bot_of_class.append(e.bot_id)
                self.classes.append((e.bot_id, e.intent))
                self.class_of[(e.bot_id, e.intent)] = len(self.classes) - 1
        ids = [self.class_of[(e.bot_id, e.intent)] for e in added]
        other.row_class = np.concatenate([self.row_class, *(np.full(len(e.phrases), c, np.int64) for c, e in zip(ids, added))])
        other.centroids = np.zeros((len(self.classes), self.centroids.shape[1]), np.float32)
        other.centroids[: len(self.centroids)] = self.centroids
        other.centroids[ids] = _centroids(vectors, [len(e.phrases) for e in added])
        self.catalog.replace_bots(set(changed), added, vectors)
        other.bots = sorted(self.catalog.bots)
        other.texts = self.catalog.live_phrases()
        other.times.index = time.perf_counter() - t0
        return other

    # ------------------------------------------------------------------ training
    def _train_lr(self, X: np.ndarray, previous: GroupModel | None) -> None:
        """Multinomial logistic regression, loss = mean cross-entropy + wd·‖W‖² (bias free),
        full-batch L-BFGS (scipy), from zero or from the previous head's weights."""
        from scipy.optimize import minimize

        cfg = self.config
        n = len(self.classes)
        d = X.shape[1]
        W0 = np.zeros((d, n), np.float64)
        b0 = np.zeros(n, np.float64)
        iterations = cfg.lr_iterations
        if previous is not None and previous.W.shape[0] == d:
            kept = [(i, previous.class_of[c]) for i, c in enumerate(self.classes) if c in previous.class_of]
            if kept and len(kept) >= n // 2:
                new, old = map(list, zip(*kept))
                W0[:, new] = previous.W[:, old]
                b0[new] = previous.b[old]
                iterations = cfg.lr_warm_iterations
                self.times.warm_started = True
        X32 = np.ascontiguousarray(X, np.float32)
        y = self.row_class
        rows = np.arange(len(y))
        onehot_counts = np.bincount(y, minlength=n).astype(np.float64)
        wd = cfg.lr_weight_decay
        m = len(y)
        calls = [0]

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            calls[0] += 1
            W = theta[: d * n].reshape(d, n).astype(np.float32)
            b = theta[d * n :].astype(np.float32)
            Z = X32 @ W + b
            Z -= Z.max(axis=1, keepdims=True)
            E = np.exp(Z)
            S = E.sum(axis=1, keepdims=True)
            loss = float((np.log(S[:, 0]) - Z[rows, y]).mean()) + wd * float((W.astype(np.float64) ** 2).sum())
            P = E / S
            P[rows, y] -= 1.0
            P /= m
            gW = (X32.T @ P).astype(np.float64) + 2 * wd * W.astype(np.float64)
            gb = P.sum(axis=0).astype(np.float64)
            return loss, np.concatenate([gW.ravel(), gb])

        del onehot_counts
        from threadpoolctl import threadpool_limits

        # Small problems: BLAS threads cost more than they bring (0.9 s vs 0.1 s at 400 phrases).
        with threadpool_limits(1 if m * n < 1_000_000 else None):
            result = minimize(
                loss_grad,
                np.concatenate([W0.ravel(), b0]),
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": iterations, "maxcor": 20, "gtol": 1e-6, "ftol": 1e-10},
            )
        self.times.lr_iterations = calls[0]
        self.W = result.x[: d * n].reshape(d, n).astype(np.float32)
        self.b = result.x[d * n :].astype(np.float32)

    # ------------------------------------------------------------------ scoring
    def features(self, Q: np.ndarray, texts: Sequence[str], exclude_bot: str | None = None) -> Features:
        """Candidates (the intents among the k nearest phrases) and their fused scores, per query."""
        cfg = self.config
        nq = len(Q)
        row_class = self.row_class  # then the classes: they never have fewer entries than it names
        n = len(self.classes)
        k = min(cfg.neighbours, len(self.catalog))
        S, I = self.catalog.search(Q, k, exclude_bot=exclude_bot)
        valid = (I >= 0) & (len(row_class) > I)
        L = np.where(valid, row_class[np.where(valid, I, 0)], -1)
        m = cfg.knn_top
        mx = np.full((nq, n), -np.inf, np.float32)
        best_row = np.full((nq, n), -1, np.int64)
        cnt = np.zeros((nq, n), np.int32)
        sm = np.zeros((nq, n), np.float32)
        r = np.arange(nq)
        # Per (query, class), over the valid neighbours in rank order (row-major: query, then j):
        # the first one gives the best cosine and phrase; the first m are summed, in that order.
        qv, jv = np.nonzero(valid)
        if len(qv):
            key = qv * n + L[qv, jv]
            order = np.argsort(key, kind="stable")
            sk = key[order]
            starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
            occurrence = np.empty(len(sk), np.int64)
            occurrence[order] = np.arange(len(sk)) - np.repeat(starts, np.diff(np.r_[starts, len(sk)]))
            first = order[starts]
            fq, fc = qv[first], L[qv[first], jv[first]]
            mx[fq, fc] = S[qv[first], jv[first]]
            best_row[fq, fc] = I[qv[first], jv[first]]
            top = occurrence < m
            tq, tj = qv[top], jv[top]
            tc = L[tq, tj]
            np.add.at(sm, (tq, tc), S[tq, tj])  # unbuffered, in neighbour order: the same float32 sums
            np.add.at(cnt, (tq, tc), 1)
        last = np.where(valid.any(1), S[r, np.maximum(valid.sum(1) - 1, 0)], 0.0)[:, None] if S.shape[1] else np.zeros((nq, 1))
        knn = (sm + (m - cnt) * last) / m
        fused = cfg.knn_weight * knn
        if self.centroids is not None:
            fused[:, : len(self.centroids)] += cfg.centroid_weight * (np.asarray(Q, np.float32) @ self.centroids.T)
        if self._svm is not None:
            fused = fused + np.asarray(Q, np.float32) @ self.W + self.b
            for head, weight in ((self._svm, cfg.svm_weight), (self._char_svm, cfg.char_svm_weight)):
                if head is not None:
                    svm = np.zeros((nq, n), np.float32)
                    svm[:, head.classes] = head.decision_function(texts)
                    fused = fused + weight * svm
        cand = cnt > 0
        qi, ci = np.nonzero(cand)
        rank_key = self._bot_scores(fused, cand)[qi, ci] if cfg.bot_first else fused[qi, ci]
        # A registered phrase goes to its intent: models without heads can rank a bot with several
        # loosely similar intents above it.
        rank_key = np.where(mx[qi, ci] >= cfg.registered_cosine, np.inf, rank_key)
        return Features(qi, ci, mx[qi, ci], best_row[qi, ci], fused[qi, ci], rank_key)

    def _bot_scores(self, fused: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Per (query, class): the score of the class's bot, T·log Σ exp(fused / T) over the bot's
        candidate intents (T = `bot_temperature`): the probability mass of the bot's intents, in
        fused-score units. A bot whose several intents all match beats a bot with one slightly
        better intent."""
        t = self.config.bot_temperature
        _, bot_index = np.unique(np.asarray(self.bot_of_class[: fused.shape[1]]), return_inverse=True)
        member = np.zeros((fused.shape[1], int(bot_index.max(initial=-1)) + 1), np.float64)
        member[np.arange(fused.shape[1]), bot_index] = 1.0
        masked = np.where(cand, fused, -np.inf).astype(np.float64)
        peak = np.max(masked, axis=1, keepdims=True, initial=-np.inf)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        mass = np.exp((masked - peak) / t) @ member
        with np.errstate(divide="ignore"):
            per_bot = t * np.log(mass) + peak
        return per_bot[:, bot_index]

    def best(
        self, Q: np.ndarray, texts: Sequence[str], exclude_bot: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per query: (best class or -1, its fused score or -inf, best score of a second bot or -inf)."""
        f = self.features(Q, texts, exclude_bot)
        nq = len(Q)
        top = np.full(nq, -1, np.int64)
        conf = np.full(nq, -np.inf)
        second = np.full(nq, -np.inf)
        order = np.lexsort((-f.fused, -f.rank_key, f.query))
        for j in order:
            q = f.query[j]
            if top[q] < 0:
                top[q], conf[q] = f.cls[j], f.fused[j]
            elif second[q] == -np.inf and self.bot_of_class[f.cls[j]] != self.bot_of_class[top[q]]:
                second[q] = f.fused[j]
        return top, conf, second

    def rank(self, query: np.ndarray, text: str, exclude_bot: str | None = None) -> list[Scored]:
        """Candidates for one utterance, rated, best first."""
        return self.rank_many(query.reshape(1, -1), [text], exclude_bot)[0]

    def rank_many(self, Q: np.ndarray, texts: Sequence[str], exclude_bot: str | None = None) -> list[list[Scored]]:
        """`rank` of many utterances at once (one search, one matrix product, one SVM call)."""
        f = self.features(np.asarray(Q, np.float32).reshape(len(texts), -1), texts, exclude_bot)
        bounds = np.searchsorted(f.query, np.arange(len(texts) + 1))  # f.query is sorted (np.nonzero)
        ratings = self.ratings(f.fused)
        ratings = np.where(f.cosine < self.config.min_cosine, np.minimum(ratings, FAIR), ratings).tolist()
        cls, cosine, rows, fused = f.cls.tolist(), f.cosine.tolist(), f.best_row.tolist(), f.fused.tolist()
        key = f.rank_key.tolist()
        classes, phrase = self.classes, self.catalog.phrase
        out = []
        for q in range(len(texts)):
            lo, hi = int(bounds[q]), int(bounds[q + 1])
            ranked = []
            for j in sorted(range(lo, hi), key=lambda j: (-key[j], -fused[j])):
                bot_id, intent = classes[cls[j]]
                ranked.append(Scored(bot_id, intent, fused[j], cosine[j], phrase(rows[j]), ratings[j]))
            out.append(ranked)
        return out

    def ratings(self, confidences: np.ndarray) -> np.ndarray:
        """`rating` of many confidences (the same comparisons, in float64)."""
        c = self.config
        d = np.asarray(confidences, np.float64) - self.tau
        return np.select(
            [d >= c.very_good_offset, d > 0, d > c.fair_plus_offset, d > c.fair_offset],
            [VERY_GOOD, GOOD, FAIR_PLUS, FAIR],
            POOR,
        ).astype(np.int64)

    def rating(self, confidence: float) -> int:
        c = self.config
        d = confidence - self.tau
        if d >= c.very_good_offset:
            return VERY_GOOD
        if d > 0:
            return GOOD
        if d > c.fair_plus_offset:
            return FAIR_PLUS
        if d > c.fair_offset:
            return FAIR
        return POOR

    def decide(self, ranked: Sequence[Scored]) -> Verdict:
        return decide(ranked, self.config.disambiguation_margin)

    def with_threshold(self, tau: float, calibration: dict) -> GroupModel:
        """A copy with another threshold (the heads are shared: they never change after building)."""
        other = copy.copy(self)
        other.tau = float(tau)
        other.calibration = dict(calibration)
        return other
