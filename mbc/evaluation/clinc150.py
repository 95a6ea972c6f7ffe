"""`mbc eval clinc150`: routing quality on CLINC150, measured through a real 10-bot mesh.

One bot per domain (its 15 intents, their `train` utterances as training phrases), each a real gRPC
server registered in a real etcd; the router (in-process, real gRPC) is calibrated through its API
on `val` + `oos_val` + `oos_train` only. Every utterance of the reported split goes through
`Router.Match`; a fixed-seed sample goes end to end through `Bot.Respond` of a bot of another
domain, so that transfers and fallbacks are what is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from bot_server.bot import Bot
from bot_server.definition import BotDefinition, DefinitionError
from bot_server.local_model import ModelIntents
from bot_server.server import BotHost
from discovery import EtcdClient
from discovery.calibration import write_calibration
from mbc.client.gateway import Conversation
from mbc.evaluation.kfold import kfold
from mbc.runtime.calibration_set import Example, dump_calibration
from mbc.runtime.channels import ChannelPool
from mbc.runtime.config import BotConfig, DecisionConfig, EncoderConfig, RouterConfig, ServerConfig, split_endpoints
from mbc.runtime.encoder import Encoder
from mbc.runtime.logs import configure
from mbc.testing.etcd import LocalEtcd
from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2, router_pb2, router_pb2_grpc
from router.calibration import generic_none
from router.decision import GroupModel
from router.server import RouterProcess

GROUP = "clinc150"
PUBLISHED = [
    ("DialogFlow (paper, test)", 0.908, 0.267),
    ("Rasa (paper, test)", 0.909, 0.312),
    ("BERT fine-tuned (paper, test)", 0.962, 0.523),
    ("MiniLM 1-NN, one threshold (test)", 0.875, 0.471),
]
T = TypeVar("T")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Dataset:
    domains: dict[str, list[str]]
    train: list[tuple[str, str]]
    calibration: list[tuple[str, str]]
    in_scope: list[tuple[str, str]]
    oos: list[str]
    bot_of: dict[str, str] = field(default_factory=dict)


def bot_id_of(domain: str) -> str:
    return name_of(domain.replace("_", "-"))


_REFUSED = re.compile(r"[^A-Za-z0-9._-]+")


def name_of(label: str) -> str:
    """A data set's label as a name the bot definitions accept (`mbc.runtime.names`): each run of
    other characters becomes "_", leading ones are dropped, at most 64 characters ("card_arrived?"
    becomes "card_arrived_")."""
    name = _REFUSED.sub("_", label).lstrip("._-")[:64]
    return name or "intent"


def intent_names(labels: list[str]) -> dict[str, str]:
    """Each label's intent name (`name_of`); labels that would share one get "-2", "-3"... after it."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for label in labels:
        name, n = name_of(label), 1
        while name in taken:
            n += 1
            name = f"{name_of(label)[: 64 - len(str(n)) - 1]}-{n}"
        out[label] = name
        taken.add(name)
    return out


DATA_FILE = "clinc150_public.json"


class DataError(ValueError):
    """The CLINC150 files given cannot be read."""


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"cannot read the {what} {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"the {what} {path} is not JSON: {e}") from None


def load(data: str, domains_path: str, split: str, max_domains: int, max_intents: int, limit: int, seed: int) -> Dataset:
    """`data`: the CLINC150 JSON file, or the directory holding it (as `clinc150_public.json`)."""
    data_file = Path(data) / DATA_FILE if Path(data).is_dir() else Path(data)
    raw = _read_json(data_file, "CLINC150 data file")
    domains_file = Path(domains_path) if domains_path else data_file.resolve().parent / "domains.json"
    domains = _read_json(domains_file, "domain list (--domains)")
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise DataError(f"the domain list {domains_file} must map each domain to its list of intents")
    if max_domains:
        domains = dict(list(domains.items())[:max_domains])
    if max_intents:
        domains = {d: intents[:max_intents] for d, intents in domains.items()}
    oos_key = f"oos_{split}"
    for key in ("train", "val", "oos_val", split, oos_key):
        if key not in raw:
            raise DataError(f"{data_file} has no {key!r} split")
    names = intent_names([str(i) for intents in domains.values() for i in intents])
    domains = {d: [names[str(i)] for i in intents] for d, intents in domains.items()}
    bot_of = {intent: bot_id_of(d) for d, intents in domains.items() for intent in intents}
    keep = lambda rows: [(t, names[i]) for t, i in rows if names.get(i) in bot_of]  # noqa: E731
    calibration = keep(raw["val"]) + [(t, "") for t, _ in raw["oos_val"] + raw.get("oos_train", [])]
    in_scope = keep(raw[split])
    oos = [t for t, _ in raw[oos_key]]
    if limit:
        rng = random.Random(seed)
        n_oos = max(1, round(limit * len(oos) / (len(in_scope) + len(oos))))
        in_scope = rng.sample(in_scope, min(len(in_scope), limit - n_oos))
        oos = rng.sample(oos, min(len(oos), n_oos))
    return Dataset(domains, keep(raw["train"]), calibration, in_scope, oos, bot_of)


def definitions(ds: Dataset) -> list[dict]:
    phrases: dict[str, list[str]] = {}
    for text, intent in ds.train:
        phrases.setdefault(intent, []).append(text)
    out = []
    for domain, intents in ds.domains.items():
        out.append(
            {
                "id": bot_id_of(domain),
                "display_name": domain.replace("_", " ").title() + " Bot",
                "group": GROUP,
                "collaboration": True,
                "fallback": f"Sorry, I can only help with {domain.replace('_', ' ')}.",
                "intents": [{"name": i, "phrases": list(dict.fromkeys(phrases[i]))} for i in intents if phrases.get(i)],
                "dialogs": [{"intent": i, "responses": [f"[{i}]"]} for i in intents if phrases.get(i)],
            }
        )
    return out


Item = tuple[str, str, str]
"""An utterance to route: (text, the bot that owns its intent or "" when out of scope, the intent)."""


def questions(ds: Dataset) -> list[Item]:
    """The reported split: its in-scope utterances, then its out-of-scope ones."""
    return [(text, ds.bot_of[intent], intent) for text, intent in ds.in_scope] + [(text, "", "") for text in ds.oos]


def calibration_examples(ds: Dataset) -> list[Example]:
    return [
        Example(text, ds.bot_of[intent], intent, GROUP) if intent else Example(text, group=GROUP)
        for text, intent in ds.calibration
    ]


# --- start -----------------------------------------------------------------------------------


@dataclass
class Mesh:
    """The mesh under evaluation: the router and a bot per domain, all in this process."""

    router: RouterProcess
    bots: dict[str, BotHost] = field(default_factory=dict)
    pool: ChannelPool = field(default_factory=ChannelPool)
    model: GroupModel | None = None
    """The group's model once trained and calibrated on every bot."""
    calibration: dict = field(default_factory=dict)
    """`model.calibration` as it was then."""
    initial_build: dict = field(default_factory=dict)
    """`model.times` as they were then."""

    async def stop_bots(self) -> None:
        for bot in self.bots.values():
            await bot.stop(forget=True)  # the evaluation's bots leave for good: an etcd given may outlive them


@contextlib.contextmanager
def etcd_endpoints(given: str) -> Iterator[tuple[str, ...]]:
    """The --etcd endpoints, or that of a LocalEtcd of the harness, started here and removed on exit."""
    if given:
        yield split_endpoints(given)
        return
    with LocalEtcd() as etcd:
        yield (etcd.endpoint,)


@contextlib.asynccontextmanager
async def start_mesh(ds: Dataset, etcd: str, encoder_backend: str, decision: DecisionConfig) -> AsyncIterator[Mesh]:
    """etcd, the router (calibrated through the set in etcd) and a bot per domain, each a real gRPC server
    registered in etcd, ready once the router has trained and calibrated on every bot.

    The router and the bots run in this process and share one encoder: a process per bot would load
    the model once per bot. Stopped on exit: bots, router, encoder, then a LocalEtcd started here."""
    async with contextlib.AsyncExitStack() as stack:
        endpoints = stack.enter_context(etcd_endpoints(etcd))
        encoder = stack.enter_context(contextlib.closing(Encoder(EncoderConfig(backend=encoder_backend))))
        # The set stored below is the eval's: a routers' calibration file must not replace it.
        decision = dataclasses.replace(decision, calibration_path="")
        config = RouterConfig(etcd_endpoints=endpoints, server=ServerConfig(port=0), decision=decision)
        mesh = Mesh(RouterProcess(config, encoder=encoder))
        stack.push_async_callback(mesh.router.stop)
        stack.push_async_callback(mesh.stop_bots)
        stack.push_async_callback(mesh.pool.close)
        async with EtcdClient(list(endpoints)) as client:  # where every replica reads its calibration set
            await write_calibration(client, dump_calibration(calibration_examples(ds)))
        started = time.monotonic()
        progress(f"eval: embedding {len(ds.train)} training phrases...")
        await encoder.aencode_phrases([text for text, _ in ds.train])
        # The bots register first and the router starts after them: one training instead of one per bot.
        await start_bots(mesh, ds, endpoints, encoder)
        progress(f"eval: {len(mesh.bots)} bots serving and registered ({time.monotonic() - started:.0f}s)")
        await mesh.router.start()
        model = await wait_trained(mesh)
        progress(
            f"eval: router ready after {time.monotonic() - started:.1f}s: tau={model.tau:.3f} ({mesh.calibration.get('method')})"
        )
        yield mesh


async def start_bots(mesh: Mesh, ds: Dataset, etcd: tuple[str, ...], encoder: Encoder) -> None:
    """A bot per domain, serving and registered in etcd, calling the mesh's router."""
    config = BotConfig(
        etcd_endpoints=etcd, router_address=mesh.router.server.address, server=ServerConfig(port=0), lease_ttl_seconds=5
    )
    for data in definitions(ds):
        bot = BotHost(config, [Bot(BotDefinition.from_dict(data))], lambda b: ModelIntents(b, config, encoder))
        mesh.bots[bot.bot.bot_id] = bot
    await asyncio.gather(*(bot.start() for bot in mesh.bots.values()))


async def wait_trained(mesh: Mesh) -> GroupModel:
    """Until the router's model of the group covers every bot and is calibrated (no time limit:
    training takes as long as the machine needs); that model, also kept as `mesh.model`."""
    progress("eval: waiting for the router to train and calibrate on all bots...")
    model, _ = await eventually(
        lambda: _trained_model(mesh), timeout=math.inf, interval=0.5, what="the router trained on every bot"
    )
    assert model is not None  # eventually returns a truthy value only
    mesh.model = model
    mesh.calibration = dict(model.calibration)
    mesh.initial_build = model.times.as_dict()
    return model


def _trained_model(mesh: Mesh) -> GroupModel | None:
    """The group's trained model (not a provisional one: router/core.py) once it has every bot."""
    core = mesh.router.core
    model = core.models.get(GROUP)
    if model is None or GROUP in core.provisional:
        return None
    if set(model.bots) == set(mesh.bots) and model.calibration.get("calibration_examples"):
        return model
    return None


# --- measure ---------------------------------------------------------------------------------


class Calls:
    """The calls of one phase: at most `concurrency` in flight; an RPC error is counted by method
    and status, and the call then counts as a miss (`failed` stands for its reply); progress on
    stderr every `every` calls."""

    def __init__(self, method: str, total: int, concurrency: int, every: int, timed: bool = False) -> None:
        self.method, self.total, self.every, self.timed = method, total, every, timed
        self.limit = asyncio.Semaphore(concurrency)
        self.errors: Counter = Counter()
        self.done = 0
        self.started = time.monotonic()

    async def call(self, rpc: Awaitable[T], failed: T) -> T:
        async with self.limit:
            try:
                reply = await rpc
            except grpc.aio.AioRpcError as e:
                self.errors[f"{self.method} {e.code().name}"] += 1
                reply = failed
        self.done += 1
        if self.done % self.every == 0:
            elapsed = f" ({time.monotonic() - self.started:.0f}s)" if self.timed else ""
            progress(f"eval: {self.method} {self.done}/{self.total}{elapsed}")
        return reply


@dataclass
class MatchPhase:
    """Every utterance through Match: `counts` (see `score_matches`), seconds, RPC errors."""

    n: int
    counts: Counter
    seconds: float
    errors: Counter


@dataclass
class EndToEnd:
    """The sample through Respond: how many, how many right, the outcomes by name, seconds, RPC errors."""

    n: int
    right: int
    outcomes: Counter
    seconds: float
    errors: Counter


async def _match(stub: router_pb2_grpc.RouterStub, text: str) -> router_pb2.MatchResponse:
    return await stub.Match(router_pb2.MatchRequest(text=text, group=GROUP, max_candidates=3), timeout=600)


async def measure_match(router: str, items: list[Item], concurrency: int) -> MatchPhase:
    """Every utterance of `items` through Router.Match over gRPC, on a plain channel: the mesh's
    service config caps Match at 5 s, too short on a loaded machine."""
    calls = Calls("Match", len(items), concurrency, every=500, timed=True)
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        replies = await asyncio.gather(*(calls.call(_match(stub, text), router_pb2.MatchResponse()) for text, _, _ in items))
        seconds = time.monotonic() - calls.started
    return MatchPhase(len(items), score_matches(items, replies), seconds, calls.errors)


def score_matches(items: list[Item], replies: list[router_pb2.MatchResponse]) -> Counter:
    """Counts: in_scope, oos; right (its bot and intent acted on), right_bot (its bot acted on),
    rejected (out of scope and no decision), disambiguations, of which disambiguations_in_scope
    and disambiguations_in_scope_top1_wrong_bot (in scope, another bot or none first)."""
    counts: Counter = Counter()
    for (_, bot_id, intent), r in zip(items, replies):
        top = r.candidates[0] if r.candidates else None
        counts["disambiguations"] += r.decision == router_pb2.DECISION_DISAMBIGUATE
        if not bot_id:
            counts["oos"] += 1
            counts["rejected"] += r.decision == router_pb2.DECISION_NONE
            continue
        counts["in_scope"] += 1
        if r.decision == router_pb2.DECISION_ACT and top is not None:
            counts["right"] += top.bot_id == bot_id and top.intent == intent
            counts["right_bot"] += top.bot_id == bot_id
        elif r.decision == router_pb2.DECISION_DISAMBIGUATE:
            counts["disambiguations_in_scope"] += 1
            counts["disambiguations_in_scope_top1_wrong_bot"] += top is None or top.bot_id != bot_id
    return counts


async def _respond(address: str, text: str, pool: ChannelPool) -> bot_pb2.RespondResponse:
    async with Conversation(address, channels=pool, timeout_seconds=600) as chat:
        return await chat.send(text)


def respond_right(r: bot_pb2.RespondResponse, bot_id: str, intent: str) -> bool:
    """In scope: transferred to its bot, for its intent; out of scope: the entry bot's fallback."""
    if bot_id:
        return r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == bot_id and r.match.intent == intent
    return r.outcome == bot_pb2.OUTCOME_FALLBACK


async def measure_end_to_end(mesh: Mesh, items: list[Item], size: int, seed: int, concurrency: int) -> EndToEnd:
    """A fixed-seed sample of `size` items through Bot.Respond of a bot of another domain (any bot
    when there is one only), so that transfers and fallbacks are what is counted (`respond_right`)."""
    rng = random.Random(seed)
    sample = rng.sample(items, min(size, len(items)))
    bot_ids = sorted(mesh.bots)
    entries = [rng.choice([b for b in bot_ids if b != bot_id] or bot_ids) for _, bot_id, _ in sample]
    calls = Calls("Respond", len(sample), concurrency, every=100)
    replies = await asyncio.gather(
        *(
            calls.call(_respond(mesh.bots[entry].identity.address, text, mesh.pool), bot_pb2.RespondResponse())
            for (text, _, _), entry in zip(sample, entries)
        )
    )
    seconds = time.monotonic() - calls.started
    counts = Counter(bot_pb2.Outcome.Name(r.outcome) for r in replies)
    right = sum(respond_right(r, bot_id, intent) for (_, bot_id, intent), r in zip(sample, replies))
    return EndToEnd(len(sample), right, counts, seconds, calls.errors)


async def measure_retrain(mesh: Mesh) -> dict:
    """A participant change: the last bot by id leaves; the seconds until the router uses a model
    retrained and recalibrated without it, and that build's times."""
    core = mesh.router.core
    builds = core.builds
    leaving = sorted(mesh.bots)[-1]
    started = time.monotonic()
    await mesh.bots.pop(leaving).stop(forget=True)  # for good: only then is the model retrained without it
    await asyncio.wait_for(core.wait_builds(builds + 1), 600)
    retrain = {"bot_left": leaving, "seconds": round(time.monotonic() - started, 2), **core.models[GROUP].times.as_dict()}
    progress(f"eval: {leaving} left; the router retrained and recalibrated in {retrain['seconds']}s")
    return retrain


# --- report ----------------------------------------------------------------------------------


def report(
    args, ds: Dataset, mesh: Mesh, match: MatchPhase, e2e: EndToEnd, retrain: dict | None, started: float, folds: dict | None
) -> dict:
    """The figures of one run (`table` prints them; --json writes them)."""
    if mesh.model is None:
        raise ValueError("no trained model to report on: wait_trained(mesh) first")
    c = match.counts
    return {
        "split": args.split,
        "encoder_backend": args.encoder_backend,
        "in_sample_calibration": args.split == "val",
        "n_in_scope": c["in_scope"],
        "n_oos": c["oos"],
        "in_scope_accuracy": round(c["right"] / max(c["in_scope"], 1), 4),
        "oos_recall": round(c["rejected"] / max(c["oos"], 1), 4),
        "bot_accuracy": round(c["right_bot"] / max(c["in_scope"], 1), 4),
        "end_to_end_accuracy": round(e2e.right / max(e2e.n, 1), 4),
        "end_to_end_n": e2e.n,
        "end_to_end_outcomes": dict(e2e.outcomes),
        "disambiguation_rate": round(c["disambiguations"] / max(match.n, 1), 4),
        "disambiguations": c["disambiguations"],
        "disambiguations_in_scope_top1_wrong_bot": c["disambiguations_in_scope_top1_wrong_bot"],
        "disambiguations_in_scope": c["disambiguations_in_scope"],
        "tau": round(mesh.model.tau, 4),
        "calibration": mesh.calibration,
        "initial_build": mesh.initial_build,
        "retrain_on_bot_leaving": retrain,
        "kfold": folds,
        "match_seconds": round(match.seconds, 2),
        "match_per_second": round(match.n / max(match.seconds, 1e-9), 1),
        "end_to_end_seconds": round(e2e.seconds, 2),
        "errors": dict(match.errors + e2e.errors),
        "bots": len(ds.domains),
        "intents": len(ds.bot_of),
        "seconds": round(time.monotonic() - started, 1),
    }


def describe(ds: Dataset, split: str) -> None:
    progress(
        f"eval: {len(ds.domains)} bots, {len(ds.bot_of)} intents, {len(ds.train)} training phrases; "
        f"split {split}: {len(ds.in_scope)} in scope + {len(ds.oos)} out of scope; "
        f"calibration: {len(ds.calibration)} utterances of val, oos_val, oos_train"
    )
    if split == "val":
        progress("eval: NOTE --split val: the router is calibrated on val, so these figures are in-sample for calibration")


async def measure_kfold(mesh: Mesh, ds: Dataset, k: int, seed: int) -> dict:
    """The k-fold figure on the calibration set (`mbc.evaluation.kfold`), with the router's model."""
    assert mesh.model is not None  # wait_trained(mesh) first
    examples = calibration_examples(ds)
    encoder = mesh.router.core.encoder
    vectors = await encoder.aencode_phrases([e.text for e in examples])
    generic = generic_none()
    generic_vectors = await encoder.aencode_phrases(generic)
    progress(f"eval: {k}-fold on the calibration set ({len(examples)} utterances)...")
    return await asyncio.to_thread(kfold, mesh.model, examples, vectors, generic, generic_vectors, k, seed)


async def run(args, decision: DecisionConfig) -> dict:
    """Load the data, start the mesh (its router deciding with `decision`), measure Match, Respond,
    the k-fold figure and a retrain, report."""
    started = time.monotonic()
    ds = load(args.data, args.domains, args.split, args.max_domains, args.max_intents, args.limit, args.seed)
    describe(ds, args.split)
    async with start_mesh(ds, args.etcd, args.encoder_backend, decision) as mesh:
        items = questions(ds)
        match = await measure_match(mesh.router.server.address, items, args.concurrency)
        e2e = await measure_end_to_end(mesh, items, args.sample, args.seed, args.concurrency)
        folds = await measure_kfold(mesh, ds, args.folds, args.seed) if args.folds > 1 else None
        retrain = await measure_retrain(mesh) if args.retrain_check and len(mesh.bots) > 2 else None
        return report(args, ds, mesh, match, e2e, retrain, started, folds)


def table(r: dict) -> str:
    rows = [
        f"CLINC150 {r['split']}: {r['bots']} bots, {r['intents']} intents, {r['n_in_scope']} in scope + {r['n_oos']} out of scope"
        + ("  [in-sample: the router was calibrated on val]" if r["in_sample_calibration"] else ""),
        f"  {'in_scope_accuracy':<24} {r['in_scope_accuracy']:.4f}   (right bot and intent, acted on; target >= 0.93)",
        f"  {'oos_recall':<24} {r['oos_recall']:.4f}   (out of scope that got a fallback; target >= 0.55)",
        f"  {'bot_accuracy':<24} {r['bot_accuracy']:.4f}   (right bot, acted on; target >= 0.98)",
        f"  {'end_to_end_accuracy':<24} {r['end_to_end_accuracy']:.4f}   "
        f"(Respond on a bot of another domain, n={r['end_to_end_n']})",
        f"  {'disambiguation_rate':<24} {r['disambiguation_rate']:.4f}   "
        f"({r['disambiguations']} questions; counted as misses above)",
        f"  {'tau':<24} {r['tau']:.3f}",
        *kfold_rows(r.get("kfold")),
        f"  {'seconds':<24} {r['seconds']:.1f}   (Match: {r['match_per_second']}/s)",
        "",
        f"  {'published (test split)':<36} {'in-scope':>8} {'oos rec':>8}",
    ]
    rows += [f"  {name:<36} {a:8.3f} {o:8.3f}" for name, a, o in PUBLISHED]
    rows.append(f"  {'mbc (this run, ' + r['split'] + ')':<36} {r['in_scope_accuracy']:8.3f} {r['oos_recall']:8.3f}")
    return "\n".join(rows)


def kfold_rows(f: dict | None) -> list[str]:
    """The k-fold figure, for `table`."""
    if not f:
        return []
    rows = [
        f"  {f['k']}-fold on the calibration set ({f['n_in_scope']} in scope + {f['n_oos']} out of scope; "
        "tau fitted on k-1 folds, measured on the fold left out): mean ± std"
    ]
    for name in ("in_scope_accuracy", "oos_recall", "bot_accuracy", "disambiguation_rate"):
        rows.append(f"    {name:<22} {f[name]['mean']:.4f} ± {f[name]['std']:.4f}")
    return rows


def main(args, decision: DecisionConfig) -> int:
    configure(args.log_level, service="eval")
    try:
        result = asyncio.run(run(args, decision))
    except (DataError, DefinitionError) as e:
        print(f"mbc eval clinc150: {e}", file=sys.stderr)
        return 2
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0
