"""The router's domain logic: keep one decision model per group in step with etcd, answer matches.

Per group, a `GroupModel` (router/decision.py) is built from the intents of its collaborating
participants: FAISS index, a logistic-regression head, a lexical SVM, and a threshold τ fitted by
calibration (router/calibration.py). Models are built aside, in a worker thread (the event loop
keeps answering from the previous models), and swapped in whole. Snapshots and calibration
changes that arrive during a build are coalesced: only the latest state is built next. A group
whose participants changed is retrained with its heads warm-started from the previous model; a
calibration change only refits τ. A large group (`DecisionConfig.heads_max_phrases`) has no heads
to train: a participant change updates its index in place, and refits τ. A group's first build
persists its trained heads beside the phrase vectors (router/model_cache.py): a restarted router
with unchanged groups restores them instead of training, so it is ready as soon as its indexes
are built.

Bots that have a definition in etcd and no live instance (absent: crashed, restarting, being
deployed) keep their intents in their group's model, so a restart neither retrains nor refits it;
they are never candidates. When the decision would hand the message over (ACT, or DISAMBIGUATE)
and the best intent is an absent bot's, Match answers NONE with NONE_REASON_BOT_UNAVAILABLE and the
bot's id: the message is never handed to a bot that matches it less well.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np

from mbc.runtime.config import RouterConfig
from mbc.runtime.encoder import Encoder
from mbc.runtime.logs import get_logger
from mbc.runtime.matching import IntentCatalog, IntentPhrases
from mbc.v1 import router_pb2
from router.calibration import (
    CalibrationInput,
    Example,
    build_group_model,
    fit_threshold,
    for_group,
    generic_none,
    update_group_model,
)
from router.decision import ACT, DISAMBIGUATE, GOOD, NONE, GroupModel, Scored, Verdict, changed_bots
from router.directory import BotEntry, Directory
from router.embedding_store import PhraseEmbeddings, open_store
from router.model_cache import DIRECTORY as HEADS_DIRECTORY
from router.model_cache import HeadsCache, heads_key

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
    calibration_version: int


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


def _names(groups: Sequence[str]) -> str:
    return ", ".join(repr(g) for g in groups)


class RouterCore:
    def __init__(self, config: RouterConfig, encoder: Encoder, calibration: Sequence[Example] = ()) -> None:
        self.config = config
        self.encoder = encoder
        self._state: _State | None = None
        self._pending: tuple[Mapping, int, Mapping] | None = None
        self._calibration: list[Example] = list(calibration)
        self._calibration_version = 0
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        self._swapped = asyncio.Condition()
        self._builder: asyncio.Task | None = None
        self._preload: asyncio.Task | None = None
        self._trainer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-train")
        self._generic = generic_none()
        self.embeddings = PhraseEmbeddings(encoder, open_store(config.embedding_cache_dir))
        """Participants' phrase vectors, persisted: a restart re-embeds only what changed."""
        store = self.embeddings.store
        self.heads = HeadsCache(store.path.parent / HEADS_DIRECTORY) if store is not None else None
        """Trained heads, persisted beside the vectors: a restart trains only what changed."""
        self.builds = 0
        """Models swapped in so far (tests and the evaluation wait on it)."""

    async def prepare(self) -> None:
        """Embed the built-in generic set ahead of the first build, through the persisted phrase
        vectors (a restart makes no model call for it), and load the training libraries once the
        router serves (or when a build trains first: heads restored from their cache need none,
        and their 5 s of imports on a loaded machine must not delay SERVING)."""
        self.encoder.remember_phrases(self._generic, await self.embeddings.embed(self._generic))
        self._preload = asyncio.get_running_loop().create_task(self._import_training_libraries_when_ready())

    async def _import_training_libraries_when_ready(self) -> None:
        await self._ready.wait()
        await asyncio.to_thread(_import_training_libraries)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        await self._ready.wait()

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

    def submit(self, participants: Mapping, revision: int, definitions: Mapping | None = None) -> None:
        """Queue a participant snapshot for indexing (the latest one wins); `definitions` (by key)
        keep the bots without a live instance in their group, absent.

        Who is alive and where takes effect at once, even while a model is being trained for an
        earlier snapshot (seconds for a large group): an instance that left is never named again.
        Matches score with the models trained so far until the build catches up."""
        definitions = definitions or {}
        self._pending = (participants, revision, definitions)
        state = self._state
        if state is not None and revision > state.directory.revision:
            try:
                directory = Directory.from_participants(
                    participants, revision, self.config.max_intents_per_bot, state.directory, definitions
                )
            except Exception:
                log.exception("directory_update_failed", revision=revision)
            else:
                self._state = _State(directory, state.models, state.sources, state.calibration_version)
        self._kick()

    def _newest(self, directory: Directory) -> Directory:
        """`directory`, or a newer one that `submit` put in place while it was being built for."""
        current = self._state.directory if self._state is not None else None
        return current if current is not None and current.revision > directory.revision else directory

    def set_calibration(self, examples: Sequence[Example]) -> int:
        """Replace the labelled calibration set; every group's τ is refitted in the background.

        Returns the calibration version; `wait_calibrated(version)` waits until it is in use."""
        self._calibration = list(examples)
        self._calibration_version += 1
        if self._pending is not None:
            self._kick()
        return self._calibration_version

    async def calibrate(self, examples: Sequence[Example], timeout: float | None = None) -> dict[str, dict]:
        """Set the calibration set, wait until every group uses it, return `thresholds()`."""
        version = self.set_calibration(examples)
        await asyncio.wait_for(self.wait_calibrated(version), timeout)
        return self.thresholds()

    async def wait_calibrated(self, version: int) -> None:
        async with self._swapped:
            await self._swapped.wait_for(lambda: self._state is not None and self._state.calibration_version >= version)

    async def wait_builds(self, count: int) -> None:
        """Until `count` models have been swapped in since start."""
        async with self._swapped:
            await self._swapped.wait_for(lambda: self.builds >= count)

    def _kick(self) -> None:
        self._wakeup.set()
        if self._builder is None or self._builder.done():
            self._builder = asyncio.get_running_loop().create_task(self._build_loop())

    async def close(self) -> None:
        for task in (self._builder, self._preload):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._trainer.shutdown(wait=False, cancel_futures=True)
        if self.embeddings.store is not None:
            self.embeddings.store.close()

    async def _build_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            pending = self._pending
            assert pending is not None  # _kick, the only waker, runs once a snapshot is pending
            participants, revision, definitions = pending
            try:
                previous = self._state.directory if self._state else None
                if previous is not None and previous.revision == revision:  # `submit` read it already
                    directory = previous
                else:
                    directory = Directory.from_participants(
                        participants, revision, self.config.max_intents_per_bot, previous, definitions
                    )
                if await self._rebuild(directory, self._calibration_version):
                    # Beside the builds, not before the next one: a change arriving meanwhile must not wait.
                    asyncio.get_running_loop().run_in_executor(None, _return_free_memory)
            except Exception:
                log.exception("index_build_failed", revision=revision)

    async def _calibration_input(self, group: str) -> CalibrationInput:
        examples = for_group(self._calibration, group)
        vectors = await self.encoder.aencode_phrases([e.text for e in examples])
        generic_vectors = await self.encoder.aencode_phrases(self._generic)
        return CalibrationInput(examples, vectors, self._generic, generic_vectors)

    async def _rebuild(self, directory: Directory, calibration_version: int) -> bool:
        """Builds what changed and swaps it in; True when a large group's index was built anew."""
        old = self._state
        loop = asyncio.get_running_loop()
        if old is not None:
            # Who is alive (and where) takes effect at once; the models follow when trained.
            self._state = _State(directory, old.models, old.sources, old.calibration_version)
        models: dict[str, GroupModel] = {}
        sources: dict[str, tuple[IntentPhrases, ...]] = {}
        rebuilt = []
        indexed = False
        old_models = old.models if old else {}
        old_sources = old.sources if old else {}
        old_calibration_version = old.calibration_version if old else None
        for group in directory.groups:
            intents = directory.candidates_of(group)
            sources[group] = intents
            if not intents:
                continue
            previous = old_models.get(group)
            # `previous` when it was built from the same intents: then only τ may need refitting.
            unchanged = previous if old_sources.get(group) == intents else None
            if unchanged is not None and old_calibration_version == calibration_version:
                models[group] = unchanged
                continue
            start = time.perf_counter()
            calibration = await self._calibration_input(group)
            if unchanged is not None:
                tau, info = await loop.run_in_executor(self._trainer, fit_threshold, unchanged, calibration)
                model = unchanged.with_threshold(tau, info)
                kind = "recalibrated"
            elif previous is not None and previous.large and not previous.catalog.drifted and self._large(intents):
                changed = changed_bots(old_sources[group], intents)
                vectors = await self.embeddings.embed(
                    IntentCatalog.phrases_of(e for entries in changed.values() for e in entries)
                )
                model = await loop.run_in_executor(self._trainer, update_group_model, previous, changed, vectors, calibration)
                kind = "updated in place"
            else:
                vectors = await self.embeddings.embed(IntentCatalog.phrases_of(intents))
                model, kind = await loop.run_in_executor(self._trainer, self._train, intents, vectors, calibration, previous)
                indexed |= kind == "indexed"
            models[group] = model
            rebuilt.append(group)
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
        async with self._swapped:
            self._state = _State(self._newest(directory), models, sources, calibration_version)
            self.builds += 1
            self._swapped.notify_all()
        self._ready.set()
        log.info(
            "index_swapped",
            revision=directory.revision,
            groups=len(models),
            rebuilt_groups=rebuilt,
            phrases=sum(len(m.texts) for m in models.values()),
            bots=sum(len(b) for b in directory.groups.values()),
        )
        return indexed

    def _train(
        self, intents, vectors: np.ndarray, calibration: CalibrationInput, previous: GroupModel | None
    ) -> tuple[GroupModel, str]:
        """A group model. Its first build in this router (a start) restores the heads trained from
        scratch on the same inputs, persisted by an earlier start, or trains and persists them. A
        change in a running router trains warm from `previous` and persists nothing: a warm start
        converges to slightly other heads than a cold one, and a restart must give the model a
        first build gives, whatever the router's history."""
        config = self.config.decision
        if self._large(intents):
            return build_group_model(intents, vectors, self.encoder.dim, config, calibration), "indexed"
        if previous is not None and previous.large:  # a group shrunk past the threshold: no heads to start from
            previous = None
        if previous is not None:
            return build_group_model(intents, vectors, self.encoder.dim, config, calibration, previous), "retrained"
        key = heads_key(self.encoder.model_id, config, intents, calibration) if self.heads is not None else ""
        heads = self.heads.load(key) if self.heads is not None else None
        if heads is not None:
            try:
                return build_group_model(intents, vectors, self.encoder.dim, config, calibration, heads=heads), "restored"
            except ValueError as e:
                log.warning("heads_cache_mismatch", error=str(e), action="training again")
        model = build_group_model(intents, vectors, self.encoder.dim, config, calibration)
        if self.heads is not None:
            self.heads.save(key, model.heads())
        return model, "retrained"

    def _large(self, intents: Sequence[IntentPhrases]) -> bool:
        """A group scored by its nearest phrases alone (no heads to train or persist)."""
        return sum(len(e.phrases) for e in intents) >= self.config.decision.heads_max_phrases

    async def match(
        self, text: str, bot_id: str, group: str, limit: int, min_rating: int, include_asking_bot: bool = False
    ) -> MatchResult:
        state = self._state
        if state is None:
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
