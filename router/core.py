"""The router's domain logic: keep one decision model per group in step with etcd, answer matches.

Per group, a `GroupModel` (router/decision.py) is built from the intents of its collaborating
participants: FAISS index, a logistic-regression head, a lexical SVM, and a threshold τ fitted by
calibration (router/calibration.py). Each group has its own build task: a change in one group never
waits for another group's training, and the directory and models of the other groups are left as
they are. At most `RouterConfig.training_concurrency` groups train at once (worker threads; the
event loop keeps answering from the previous models), and each model is swapped in alone. Changes
that arrive while a group trains are coalesced: the group's next build takes its latest state. A
calibration change only refits τ. A large group (`DecisionConfig.heads_max_phrases`) has no heads
to train: a participant change updates its index in place, and refits τ.

Replicas agree: a model is a function of its group's intents and the calibration set, never of the
router's history. Heads are always trained from scratch (never warm-started from the previous
model), with fixed seeds, and persisted beside the phrase vectors (router/model_cache.py), so a
router that finds them restores them and one that does not trains the same heads again.

Bots that have a definition in etcd and no live instance (absent: crashed, restarting, being
deployed) keep their intents in their group's model, so a restart neither retrains nor refits it;
they are never candidates. When the decision would hand the message over (ACT, or DISAMBIGUATE)
and the best intent is an absent bot's, Match answers NONE with NONE_REASON_BOT_UNAVAILABLE and the
bot's id: the message is never handed to a bot that matches it less well.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

from mbc.runtime.calibration_set import Example
from mbc.runtime.config import RouterConfig
from mbc.runtime.encoder import Encoder
from mbc.runtime.logs import get_logger
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import router_pb2
from router.calibration import CalibrationInput, build_group_model, fit_threshold, for_group, generic_none, update_group_model
from router.decision import ACT, DISAMBIGUATE, GOOD, NONE, GroupModel, Heads, Scored, Verdict, changed_bots
from router.directory import BotEntry, Directory
from router.embedding_store import PhraseEmbeddings, open_store
from router.model_cache import DIRECTORY as HEADS_DIRECTORY
from router.model_cache import HeadsCache, heads_from_bytes, heads_key
from router.peers import PeerError, Peers

log = get_logger(__name__)


def _import_training_libraries() -> None:
    import scipy.optimize  # noqa: F401
    import sklearn.feature_extraction.text  # noqa: F401
    import sklearn.svm  # noqa: F401


def _return_free_memory() -> None:
    """Gives the heap that a large build freed back to the system (glibc's `malloc_trim`; nothing
    elsewhere): about 100 MB at a million phrases, measured."""
    started = time.perf_counter()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return
    log.info("heap_trimmed", seconds=round(time.perf_counter() - started, 3))


class NotReady(Exception):
    """No participant snapshot has been indexed yet."""


class UnknownBot(Exception):
    pass


class GroupMismatch(Exception):
    pass


class AmbiguousBot(Exception):
    """The asking bot's id is registered in several groups and the request names none."""


@dataclass(frozen=True)
class Candidate:
    match: Scored
    display_name: str
    instance_id: str
    address: str


@dataclass(frozen=True)
class MatchResult:
    candidates: list[Candidate]
    revision: int
    decision: router_pb2.Decision
    none_reason: router_pb2.NoneReason = router_pb2.NONE_REASON_UNSPECIFIED
    unavailable_bot_id: str = ""
    """With NONE_REASON_BOT_UNAVAILABLE: the absent bot whose intent matched best."""


@dataclass(frozen=True)
class _State:
    directory: Directory
    models: Mapping[str, GroupModel]
    sources: Mapping[str, tuple[IntentPhrases, ...]]
    """Per group: the intents its trained model was built from (a provisional model serving
    meanwhile is of the wanted ones)."""
    calibrated: Mapping[str, int]
    """Per group: the calibration version its τ was fitted with."""
    keys: Mapping[str, str]
    """Per group with trained heads: their `heads_key` (what a peer asks for)."""


PEER_WAIT_STEP_SECONDS = 15.0
"""Longest single wait of a GetHeads call: the owner is asked again after it (it may have left)."""


@dataclass(frozen=True)
class _Gathered:
    """What a group's build found before training (`RouterCore._gather`)."""

    calibration: CalibrationInput
    how: str
    """What the build will do: recalibrated, updated in place, indexed, restored, fetched, retrained."""
    vectors: np.ndarray | None = None
    key: str = ""
    heads: Heads | None = None
    changed: Mapping[str, Sequence[IntentPhrases]] | None = None


class _Scorer:
    """Scores a micro-batch of Match utterances (`Encoder.aencode(..., post=)`), off the event loop.

    Equal for the Matches that ask the same groups of the same state with the same excluded bot:
    those are scored together, one `GroupModel.rank_many` call per group."""

    __slots__ = ("state", "groups", "exclude")

    def __init__(self, state: _State, groups: tuple[str, ...], exclude: str | None) -> None:
        self.state, self.groups, self.exclude = state, groups, exclude

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Scorer)
            and other.state is self.state
            and other.groups == self.groups
            and other.exclude == self.exclude
        )

    def __hash__(self) -> int:
        return hash((id(self.state), self.groups, self.exclude))

    def __call__(self, Q: np.ndarray, texts: list[str]) -> list[list[tuple[float, Verdict, float, str]]]:
        """Per utterance: (confidence of the first candidate − τ, verdict, τ, group) of each group that has candidates."""
        _faiss_on_one_thread()
        out: list[list[tuple[float, Verdict, float, str]]] = [[] for _ in texts]
        for name in self.groups:
            model = self.state.models.get(name)
            if model is None:
                continue
            for verdicts, ranked in zip(out, model.rank_many(Q, texts, exclude_bot=self.exclude)):
                verdict = model.decide(ranked)
                if verdict.candidates:
                    verdicts.append((verdict.candidates[0].confidence - model.tau, verdict, model.tau, name))
        return out


_threads = threading.local()


def _faiss_on_one_thread() -> None:
    """FAISS's own OpenMP team (large groups' IVF index) would spin beside the encoder's threads:
    one thread on each scoring thread (an OpenMP setting per calling thread, set once: the call
    costs as much as a small search); measured 8.8 ms instead of 20 ms per single Match on 2
    loaded cores."""
    if not getattr(_threads, "faiss_single", False):
        faiss.omp_set_num_threads(1)
        _threads.faiss_single = True


def _blas_on_one_thread() -> None:
    """OpenBLAS on one thread for the whole process, for good. Scoring's products are small (a
    micro-batch of utterances by a group's phrases): a second thread brings little and spins after
    each call on the cores the encoder and the event loop need (measured on 2 cores, one utterance:
    1.7 ms of CPU on one thread against 8.8 ms on two). And it is set once, not lowered while
    scoring runs: the count is the process's, and a training whose thread count changed under it
    (a Match scored beside it) trained heads that differed in the last bits from a replica's. The
    cost: the heads of the largest groups train on one core."""
    ThreadpoolController().limit(limits=1, user_api="blas")


def _names(groups: Sequence[str]) -> str:
    return ", ".join(repr(g) for g in groups)


class RouterCore:
    def __init__(self, config: RouterConfig, encoder: Encoder, calibration: Sequence[Example] = ()) -> None:
        _blas_on_one_thread()
        self.config = config
        self.encoder = encoder
        self._state: _State | None = None
        self._wanted: dict[str, tuple[IntentPhrases, ...]] = {}
        """Per group with intents: what its model is to be built from (the latest snapshot)."""
        self._initial: set[str] | None = None
        """The groups of the first snapshot: the router is ready once each has a model."""
        self._calibration: list[Example] = list(calibration)
        self._calibration_version = 0
        """Counts the changes of what τ is fitted from (the calibration set, a group's costs)."""
        self._set_version = 0
        """`_calibration_version` when the calibration set last changed (every group's τ)."""
        self._group_costs: dict[str, dict[str, float]] = {}
        """Per group that sets some, its own decision costs (`set_group_costs`)."""
        self._costs_version: dict[str, int] = {}
        """Per group, `_calibration_version` when its costs last changed (its τ alone)."""
        self._ready = asyncio.Event()
        self._serving = asyncio.Event()
        self._provisional: set[str] = set()
        """Groups served by a heads-free model of their latest intents while their heads train."""
        self._training_wanted = asyncio.Event()
        """Set once a build is about to train: the training libraries are loaded then."""
        self._changed_at: dict[str, float] = {}
        """Per group, when its intents last changed (event-loop time): heads train once it is quiet."""
        self._swapped = asyncio.Condition()
        self._builders: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(config.training_concurrency)
        self._waits: dict[str, tuple[asyncio.Event, tuple[IntentPhrases, ...], int]] = {}
        """Per group whose build waits for a peer's heads: an event set when the state it waits
        for (intents, `_fit_version`) is no longer the wanted one."""
        self._gathering = asyncio.Semaphore(2 * config.training_concurrency)
        """Groups whose phrases are being embedded at once: enough to keep the encoder and the
        peers busy, few enough that groups become ready one after another, not all at the end."""
        self._embedding = 0
        """Groups waiting for their phrases' vectors (or embedding them)."""
        self._embedded = asyncio.Event()
        """Set while no group waits for its phrases' vectors."""
        self._embedded.set()
        self._preload: asyncio.Task | None = None
        self._trainer = ThreadPoolExecutor(max_workers=config.training_concurrency, thread_name_prefix="router-train")
        self._generic = generic_none()
        self.embeddings = PhraseEmbeddings(encoder, open_store(config.embedding_cache_dir))
        """Participants' phrase vectors, persisted: a restart re-embeds only what changed."""
        self.peers: Peers | None = None
        """The other replicas, when they share the work (router/peers.py); set before `submit`."""
        store = self.embeddings.store
        self.heads = HeadsCache(store.path.parent / HEADS_DIRECTORY) if store is not None else None
        """Trained heads, persisted beside the vectors: a restart trains only what changed."""
        self.builds = 0
        """Group models swapped in so far (tests and the evaluation wait on it)."""
        self.built: dict[str, int] = {}
        """Group models built so far, by how (retrained, fetched from a peer, restored, ...)."""

    async def prepare(self) -> None:
        """Embed the built-in generic set ahead of the first build, through the persisted phrase
        vectors (a restart makes no model call for it), and load the training libraries once a
        build is about to train (heads restored from their cache need none, and their 5 s of
        imports on a loaded machine must not delay SERVING, nor the phrases of a cold start)."""
        self.encoder.remember_phrases(self._generic, await self.embeddings.embed(self._generic))
        self._preload = asyncio.get_running_loop().create_task(self._import_training_libraries_when_wanted())

    async def _import_training_libraries_when_wanted(self) -> None:
        await self._training_wanted.wait()
        await asyncio.to_thread(_import_training_libraries)

    @property
    def ready(self) -> bool:
        """Every group of the first snapshot has its trained model (or has left since)."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    @property
    def serving(self) -> bool:
        """Every group of the first snapshot has a model, trained or provisional: Match answers."""
        return self._serving.is_set()

    async def wait_serving(self) -> None:
        await self._serving.wait()

    @property
    def provisional(self) -> list[str]:
        """The groups answered by a provisional (heads-free) model while their heads train (sorted)."""
        return sorted(self._provisional)

    @property
    def directory(self) -> Directory | None:
        return self._state.directory if self._state else None

    @property
    def models(self) -> Mapping[str, GroupModel]:
        return self._state.models if self._state else {}

    def thresholds(self) -> dict[str, dict]:
        """Per group: τ and how it was fitted, with build times."""
        return {g: {**m.calibration, **m.times.as_dict()} for g, m in self.models.items()}

    @property
    def calibration(self) -> list[Example]:
        return list(self._calibration)

    @property
    def training(self) -> list[str]:
        """The groups whose model is being built or waits to be (sorted)."""
        return sorted(g for g, task in self._builders.items() if not task.done())

    def submit(self, participants: Mapping, revision: int, definitions: Mapping | None = None) -> None:
        """Take a participant snapshot; `definitions` (by key) keep the bots without a live
        instance in their group, absent.

        Who is alive and where takes effect at once, even while models are being trained for an
        earlier snapshot (seconds for a large group): an instance that left is never named again.
        A group left without intents loses its model at once; each group whose intents changed
        gets its model rebuilt by its own task, and Matches score with the models trained so far
        until it is swapped in."""
        state = self._state
        if state is not None and revision < state.directory.revision:
            log.warning("snapshot_ignored", revision=revision, current=state.directory.revision)
            return
        previous = state.directory if state is not None else None
        try:
            directory = Directory.from_participants(
                participants, revision, self.config.max_intents_per_bot, previous, definitions or {}
            )
        except Exception:
            log.exception("directory_update_failed", revision=revision)
            return
        wanted = {}
        for group in sorted(directory.groups):
            intents = directory.candidates_of(group)
            if intents:
                wanted[group] = intents
        now = asyncio.get_running_loop().time()
        self._changed_at = {g: now if self._wanted.get(g) != i else self._changed_at.get(g, now) for g, i in wanted.items()}
        self._wanted = wanted
        if self._initial is None:
            self._initial = set(wanted)
        models, sources, calibrated, keys = (
            (state.models, state.sources, state.calibrated, state.keys) if state else ({}, {}, {}, {})
        )
        self._state = _State(
            directory,
            {g: m for g, m in models.items() if g in wanted},
            {g: s for g, s in sources.items() if g in wanted},
            {g: v for g, v in calibrated.items() if g in wanted},
            {g: k for g, k in keys.items() if g in wanted},
        )
        for group in wanted:
            self._kick(group)
        self._end_stale_waits()
        self._check_ready()

    def set_calibration(self, examples: Sequence[Example]) -> int:
        """Replace the labelled calibration set; every group's τ is refitted in the background.

        Returns the calibration version; `wait_calibrated(version)` waits until it is in use."""
        self._calibration = list(examples)
        self._calibration_version += 1
        self._set_version = self._calibration_version
        self._refit(self._wanted)
        return self._calibration_version

    def set_group_costs(self, costs: Mapping[str, Mapping[str, float]]) -> None:
        """Each group's own decision costs (`router.calibration.cost_overrides`: router settings by
        name; a group left out has the router's). The τ of each group whose costs changed is
        refitted in the background, and only theirs (its heads do not depend on them)."""
        wanted = {group: dict(c) for group, c in costs.items() if c}
        changed = {g for g in wanted.keys() | self._group_costs.keys() if wanted.get(g) != self._group_costs.get(g)}
        if not changed:
            return
        self._calibration_version += 1
        self._costs_version.update(dict.fromkeys(changed, self._calibration_version))
        self._group_costs = wanted
        self._refit(changed)

    def _fit_version(self, group: str) -> int:
        """The version of what `group`'s τ is to be fitted from: the calibration set and its costs."""
        return max(self._set_version, self._costs_version.get(group, 0))

    def _refit(self, groups: Iterable[str]) -> None:
        """What the τ of `groups` is fitted from changed: refitted in the background."""
        if self._state is not None:
            for group in groups:
                if group in self._wanted:
                    self._kick(group)
        self._end_stale_waits()

    def _end_stale_waits(self) -> None:
        """Wakes the builds waiting for a peer's heads of a state no longer wanted (the owner may
        never train it). Only those: a change elsewhere in the mesh leaves the others waiting."""
        for group, (event, intents, version) in self._waits.items():
            if self._wanted.get(group) != intents or self._fit_version(group) != version:
                event.set()

    async def calibrate(self, examples: Sequence[Example], timeout: float | None = None) -> dict[str, dict]:
        """Set the calibration set, wait until every group uses it, return `thresholds()`."""
        version = self.set_calibration(examples)
        await asyncio.wait_for(self.wait_calibrated(version), timeout)
        return self.thresholds()

    async def wait_calibrated(self, version: int) -> None:
        def calibrated() -> bool:
            state = self._state
            return state is not None and all(state.calibrated.get(g, 0) >= version for g in self._wanted)

        async with self._swapped:
            await self._swapped.wait_for(calibrated)

    async def wait_builds(self, count: int) -> None:
        """Until `count` group models have been swapped in since start."""
        async with self._swapped:
            await self._swapped.wait_for(lambda: self.builds >= count)

    def _stale(self, group: str) -> bool:
        """The group has intents and no model of them fitted with the current calibration."""
        state, wanted = self._state, self._wanted.get(group)
        if state is None or wanted is None:
            return False
        return (
            group in self._provisional
            or state.sources.get(group) != wanted
            or state.calibrated.get(group) != self._fit_version(group)
        )

    def _kick(self, group: str) -> None:
        if not self._stale(group):
            return
        task = self._builders.get(group)
        if task is None or task.done():
            self._builders[group] = asyncio.get_running_loop().create_task(self._build_loop(group), name=f"build {group}")

    def _check_ready(self) -> None:
        state = self._state
        if self._ready.is_set() or state is None or self._initial is None:
            return
        if not self._serving.is_set() and all(g in state.models or g not in self._wanted for g in self._initial):
            self._serving.set()
            log.info("router_serving_models", revision=state.directory.revision, provisional=len(self._provisional))
        untrained = [g for g in self._initial if g in self._wanted and (g not in state.models or g in self._provisional)]
        if not untrained:
            self._serving.set()
            self._ready.set()
            log.info("router_ready", revision=state.directory.revision, groups=len(state.models))

    async def close(self) -> None:
        tasks = [t for t in (*self._builders.values(), self._preload) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._trainer.shutdown(wait=False, cancel_futures=True)
        if self.embeddings.store is not None:
            self.embeddings.store.close()

    async def _build_loop(self, group: str) -> None:
        """Builds `group`'s model until it matches the latest snapshot and calibration set, one
        build at a time: what changes during a build is built next (the newest state wins).

        What peers can do (embed phrases, train heads) is gathered first, outside the training
        slots: a group waiting for its owner's heads never holds a slot that this replica's own
        groups need (two replicas waiting on each other's slots would stall until the wait ends)."""
        while self._stale(group):
            intents, version, examples = self._wanted[group], self._fit_version(group), self._calibration
            try:
                gathered = await self._gather(group, intents, examples, version)
            except Exception:
                log.exception("group_build_failed", group=group)
                return  # the next change of the group, or of the calibration, tries again
            if self.config.provisional_models:
                # Routable first: training waits while groups wait for their phrases' vectors (on a
                # cold start, every group is served provisionally before any is trained), and a
                # group's heads wait for it to be quiet (bots of a group start over seconds).
                await self._before_training(group, intents, quiet=gathered.how == "retrained")
                if self._wanted.get(group) != intents:
                    continue  # changed meanwhile: served provisionally at once, then trained
            if gathered.how == "retrained":
                self._training_wanted.set()
            async with self._slots:
                if not self._stale(group):  # waiting for a slot, the group may have left or been built
                    break
                if self._wanted.get(group) != intents or self._fit_version(group) != version:
                    continue  # changed while gathering: gather the newest state
                try:
                    model, fresh_index, key = await self._build(group, intents, gathered)
                except Exception:
                    log.exception("group_build_failed", group=group)
                    return
            await self._swap(group, intents, version, model, key)
            if fresh_index:
                # Beside the builds, not before the next one: a change arriving meanwhile must not wait.
                asyncio.get_running_loop().run_in_executor(None, _return_free_memory)

    async def _before_training(self, group: str, intents: tuple[IntentPhrases, ...], quiet: bool) -> None:
        """Until no group waits for its phrases' vectors and (`quiet`) `group` has not changed for
        `RouterConfig.train_quiet_seconds`; or until `group` changes from `intents`: its next build
        starts at once from the newest state (and serves it provisionally)."""
        loop = asyncio.get_running_loop()
        while self._wanted.get(group) == intents:  # checked every 0.25 s at most
            left = self._changed_at.get(group, 0.0) + self.config.train_quiet_seconds - loop.time() if quiet else 0.0
            if left > 0:
                await asyncio.sleep(min(left, 0.25))
            elif self._embedded.is_set():
                return
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._embedded.wait(), 0.25)

    async def _swap(self, group: str, intents: tuple[IntentPhrases, ...], version: int, model: GroupModel, key: str) -> None:
        """Puts one group's new model in place; the others are left as they are."""
        async with self._swapped:
            state = self._state
            assert state is not None  # a build starts from a submitted snapshot
            if group in self._wanted:  # else the group lost its intents while it trained
                self._provisional.discard(group)
                state = self._state = _State(
                    state.directory,
                    {**state.models, group: model},
                    {**state.sources, group: intents},
                    {**state.calibrated, group: version},
                    {**{g: k for g, k in state.keys.items() if g != group}, **({group: key} if key else {})},
                )
            self.builds += 1
            self._swapped.notify_all()
        self._check_ready()
        log.info(
            "index_swapped",
            revision=state.directory.revision,
            group=group,
            groups=len(state.models),
            phrases=len(model.texts),
            training=self.training,
        )

    async def _calibration_input(self, examples: Sequence[Example], group: str) -> CalibrationInput:
        mine = for_group(examples, group)
        vectors = await self.encoder.aencode_phrases([e.text for e in mine])
        generic_vectors = await self.encoder.aencode_phrases(self._generic)
        return CalibrationInput(mine, vectors, self._generic, generic_vectors, self._group_costs.get(group, {}))

    async def _gather(
        self, group: str, intents: tuple[IntentPhrases, ...], examples: Sequence[Example], version: int
    ) -> _Gathered:
        """What `group`'s build needs that is not training: the calibration input, the phrase
        vectors (from the cache or the phrases' owners), and trained heads when this replica's
        cache or the group's owner has them."""
        state = self._state
        assert state is not None
        calibration = await self._calibration_input(examples, group)
        # A provisional model is of other intents than `sources` says (the trained model it replaced).
        previous = state.models.get(group) if group not in self._provisional else None
        if previous is not None and state.sources.get(group) == intents:  # same intents: only τ to refit
            # Under the key of the new inputs: a replica that starts now finds (or fetches) them.
            key = "" if previous.large else heads_key(self.encoder.model_id, self.config.decision, intents, calibration)
            return _Gathered(calibration, "recalibrated", key=key)
        if previous is not None and previous.large and not previous.catalog.drifted and self._large(intents):
            changed = changed_bots(state.sources[group], intents)
            async with self._embedding_phase():
                phrases = IntentCatalog.phrases_of(e for entries in changed.values() for e in entries)
                vectors = await self.embeddings.embed(phrases)
            return _Gathered(calibration, "updated in place", vectors, changed=changed)
        async with self._embedding_phase():
            vectors = await self.embeddings.embed(IntentCatalog.phrases_of(intents))
        if self._large(intents):
            return _Gathered(calibration, "indexed", vectors)
        key = heads_key(self.encoder.model_id, self.config.decision, intents, calibration)
        heads = await asyncio.to_thread(self.heads.load, key) if self.heads is not None else None
        how = "restored"
        if heads is None:
            # Heads to train or fetch (seconds to minutes): a group with no trained model is served meanwhile.
            if self.config.provisional_models:
                await self._serve_provisional(group, intents, vectors, calibration)
            heads, how = await self._heads_from_owner(group, key, intents, version), "fetched"
        return _Gathered(calibration, how if heads is not None else "retrained", vectors, key, heads)

    @contextlib.asynccontextmanager
    async def _embedding_phase(self):
        """A group's phrases being embedded (at most `_gathering` groups at once), counted: builds
        wait for no group to be embedding before they train (`_build_loop`)."""
        self._embedding += 1
        self._embedded.clear()
        try:
            async with self._gathering:
                yield
        finally:
            self._embedding -= 1
            if not self._embedding:
                self._embedded.set()

    async def _serve_provisional(
        self, group: str, intents: tuple[IntentPhrases, ...], vectors: np.ndarray, calibration: CalibrationInput
    ) -> None:
        """Serves `group` at once, while its heads are trained or fetched, with a model of no heads:
        the nearest phrases and the intents' centroids, τ from the generic none-of-these set (what a
        group too large for heads always uses). A group whose intents changed is served so too: a
        bot that joins is routable in seconds, not after its group's training."""
        config = self.config.decision
        loop = asyncio.get_running_loop()
        model = await loop.run_in_executor(
            None, lambda: build_group_model(intents, vectors, self.encoder.dim, config, calibration, heads_free=True)
        )
        async with self._swapped:
            state = self._state
            if state is None or self._wanted.get(group) != intents or state.sources.get(group) == intents:
                return  # changed meanwhile, or trained already
            self._provisional.add(group)
            keys = {g: k for g, k in state.keys.items() if g != group}  # the heads it served are gone
            self._state = _State(state.directory, {**state.models, group: model}, state.sources, state.calibrated, keys)
            self.built["provisional"] = self.built.get("provisional", 0) + 1
        self._check_ready()
        log.info(
            "provisional_model_served", group=group, intents=len(model.classes), phrases=len(model.texts), tau=round(model.tau, 4)
        )

    async def _heads_from_owner(self, group: str, key: str, intents: tuple[IntentPhrases, ...], version: int) -> Heads | None:
        """The heads of `key` from the replica that owns them, waiting for it to train them (up to
        `peer_wait_seconds` in all); None when this replica owns them, cannot get them, or no
        longer wants them (the group, the calibration set or the group's costs changed meanwhile:
        the owner may never train this state)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.peer_wait_seconds
        failures = 0
        changed = asyncio.Event()
        self._waits[group] = (changed, intents, version)
        try:
            while self.peers is not None and (owner := self.peers.owner(key)) is not None:
                remaining = deadline - loop.time()
                if remaining <= 0 or failures >= 3:
                    log.warning("peer_heads_not_received", group=group, peer=owner, action="training here")
                    return None
                if self._wanted.get(group) != intents or self._fit_version(group) != version:
                    return None
                asking = asyncio.ensure_future(self.peers.heads(owner, key, min(remaining, PEER_WAIT_STEP_SECONDS)))
                interrupted = asyncio.ensure_future(changed.wait())
                await asyncio.wait({asking, interrupted}, return_when=asyncio.FIRST_COMPLETED)
                interrupted.cancel()
                if not asking.done():
                    asking.cancel()
                    return None  # the state waited for is no longer wanted
                try:
                    data = asking.result()
                except PeerError as e:
                    failures += 1
                    log.info("peer_heads_failed", group=group, peer=owner, error=str(e), attempt=failures)
                    await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))
                    continue
                if data is None:
                    continue  # not trained yet there: ask again (the owner may have changed meanwhile)
                try:
                    return await asyncio.to_thread(heads_from_bytes, data)
                except ValueError as e:
                    log.warning("peer_heads_unreadable", group=group, peer=owner, error=str(e), action="training here")
                    return None
            return None
        finally:
            if self._waits.get(group, (None,))[0] is changed:
                del self._waits[group]

    async def published_heads(self, key: str, wait: float = 0.0) -> Heads | None:
        """The heads of `key` if this replica has them (a current model, or its cache), waiting up
        to `wait` seconds for a build to produce them (a peer's `GetHeads`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            state = self._state
            if state is not None:
                for group, k in state.keys.items():
                    model = state.models.get(group)
                    if k == key and model is not None:
                        return model.heads()
            heads = await asyncio.to_thread(self.heads.load, key) if self.heads is not None else None
            remaining = deadline - loop.time()
            if heads is not None or remaining <= 0:
                return heads
            async with self._swapped:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._swapped.wait(), remaining)

    async def _build(self, group: str, intents: tuple[IntentPhrases, ...], gathered: _Gathered) -> tuple[GroupModel, bool, str]:
        """`group`'s model for `intents` from what `_gather` found, in a training slot: (the model,
        True when a large group's index was built anew, its heads key)."""
        state = self._state
        assert state is not None
        loop = asyncio.get_running_loop()
        previous = state.models.get(group)
        start = time.perf_counter()
        calibration, kind, vectors = gathered.calibration, gathered.how, gathered.vectors
        if kind == "recalibrated":
            assert previous is not None
            tau, info = await loop.run_in_executor(self._trainer, fit_threshold, previous, calibration)
            model = previous.with_threshold(tau, info)
            if gathered.key and self.heads is not None:
                await loop.run_in_executor(self._trainer, self.heads.save, gathered.key, model.heads())
        elif kind == "updated in place":
            assert previous is not None and vectors is not None and gathered.changed is not None
            changed = gathered.changed
            model = await loop.run_in_executor(self._trainer, update_group_model, previous, changed, vectors, calibration)
        else:
            assert vectors is not None
            model, kind = await loop.run_in_executor(self._trainer, self._train, intents, vectors, gathered)
        log.info(
            "group_model_built",
            group=group,
            how=kind,
            build_seconds=round(time.perf_counter() - start, 3),
            intents=len(model.classes),
            phrases=len(model.texts),
            **model.calibration,
            **model.times.as_dict(),
        )
        self.built[kind] = self.built.get(kind, 0) + 1
        return model, kind == "indexed", gathered.key if not model.large else ""

    def _train(self, intents, vectors: np.ndarray, gathered: _Gathered) -> tuple[GroupModel, str]:
        """A group model that depends on its inputs only: heads trained from scratch (or taken as
        trained for the same inputs by an earlier build, here or by the peer that owns them), so
        replicas, restarted or not, warm or cold cache, decide alike. Warm-starting from the
        previous model would be faster but would make the heads depend on the router's history."""
        config, calibration = self.config.decision, gathered.calibration
        _faiss_on_one_thread()  # cross-fitting searches: FAISS's team would spin beside the other build
        if self._large(intents):
            return build_group_model(intents, vectors, self.encoder.dim, config, calibration), "indexed"
        if gathered.heads is not None:
            try:
                model = build_group_model(intents, vectors, self.encoder.dim, config, calibration, heads=gathered.heads)
            except ValueError as e:
                log.warning("heads_mismatch", error=str(e), source=gathered.how, action="training again")
            else:
                if gathered.how == "fetched" and self.heads is not None:
                    self.heads.save(gathered.key, gathered.heads)
                return model, gathered.how
        model = build_group_model(intents, vectors, self.encoder.dim, config, calibration)
        if self.heads is not None:
            self.heads.save(gathered.key, model.heads())
        return model, "retrained"

    def _large(self, intents: Sequence[IntentPhrases]) -> bool:
        """A group scored by its nearest phrases alone (no heads to train or persist)."""
        return sum(len(e.phrases) for e in intents) >= self.config.decision.heads_max_phrases

    async def match(
        self, text: str, bot_id: str, group: str, limit: int, min_rating: int, include_asking_bot: bool = False
    ) -> MatchResult:
        state = self._state
        if state is None or not self.serving:
            raise NotReady("the router has not indexed the participants yet")
        if bot_id:
            # Bot ids are unique within a group only: the asker is looked up in the group named,
            # or, when none is named, in the one group that has that bot id (never guessed).
            found = state.directory.groups_of(bot_id)
            if not found:
                raise UnknownBot(f"bot {bot_id!r} is not a registered participant")
            if group and group not in found:
                raise GroupMismatch(f"bot {bot_id!r} belongs to group {_names(found)}, not {group!r}")
            if not group:
                # A bot that asks is live: groups where a bot of that id is only remembered (absent)
                # do not make the question ambiguous.
                live = [g for g in found if not state.directory.groups[g][bot_id].absent]
                found = live or found
                if len(found) > 1:
                    raise AmbiguousBot(
                        f"bot {bot_id!r} is registered in groups {_names(found)}: name the group of the asking bot"
                    )
            group = group or found[0]
        groups = [group] if group else sorted(state.models)
        exclude = bot_id if bot_id and not include_asking_bot else None
        # Encoded and scored on the encoder thread, with the concurrent Matches of the same groups.
        verdicts = (await self.encoder.aencode([text], post=_Scorer(state, tuple(groups), exclude)))[0]
        if not verdicts:
            return MatchResult([], state.directory.revision, NONE)
        # Across groups (an operator's view), confidences compare relative to each group's τ.
        verdicts.sort(key=lambda v: -v[0])
        decision, absent = self._decide_absent(state.directory, verdicts[0][1], verdicts[0][3], bot_id)
        # Each candidate with the group it was scored in: its bot id alone may name a bot of another group.
        ranked = [(c.confidence - tau, name, c) for _, v, tau, name in verdicts for c in v.candidates]
        if len(verdicts) > 1:
            ranked.sort(key=lambda item: -item[0])
        out = []
        # One instance per bot per Match: picking per candidate, a bot with two intents in the
        # answer and two instances sent every top candidate to the same instance.
        instances: dict[tuple[str, str], tuple[str, str]] = {}
        for _, name, m in ranked:
            if m.rating < min_rating:
                continue
            bot: BotEntry | None = state.directory.find_bot(m.bot_id, name)
            # The asking bot is live whatever the directory says (it may be draining: deregistered,
            # finishing its calls); it answers its own intents itself, with no address needed.
            if bot is None or (bot.absent and m.bot_id != bot_id):
                continue
            if (name, m.bot_id) not in instances:
                instances[(name, m.bot_id)] = bot.pick_instance() if bot.instances else ("", "")
            instance_id, address = instances[(name, m.bot_id)]
            out.append(Candidate(m, bot.display_name, instance_id, address))
            if len(out) >= limit:
                break
        if absent:
            return MatchResult(out, state.directory.revision, decision, router_pb2.NONE_REASON_BOT_UNAVAILABLE, absent)
        return MatchResult(out, state.directory.revision, decision)

    @staticmethod
    def _decide_absent(directory: Directory, verdict: Verdict, group: str, asking: str = "") -> tuple[router_pb2.Decision, str]:
        """`verdict`'s decision given the absent bots, and the absent bot to name ("" for none). The
        asking bot is never absent: it asked.

        ACT or DISAMBIGUATE whose first candidate is an absent bot's: NONE, naming it. A
        DISAMBIGUATE with an absent option after a live first one drops it; if a single bot is
        left, it gets the message (ACT) only when it is GOOD on its own, else NONE naming the
        absent bot (it matched about as well)."""
        decision = verdict.decision
        if decision not in (ACT, DISAMBIGUATE) or not verdict.candidates:
            return decision, ""

        def absent(m: Scored) -> bool:
            if m.bot_id == asking:
                return False
            bot = directory.find_bot(m.bot_id, group)
            return bot is not None and bot.absent

        top = verdict.candidates[0]
        if absent(top):
            return NONE, top.bot_id
        if decision == DISAMBIGUATE:
            gone = [m for m in verdict.candidates if absent(m)]
            if gone and len({m.bot_id for m in verdict.candidates if not absent(m)}) < 2:
                return (ACT, "") if top.rating >= GOOD else (NONE, gone[0].bot_id)
        return decision, ""
