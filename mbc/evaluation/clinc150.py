"""`mbc eval clinc150`: routing quality on CLINC150, measured through a real 10-bot mesh.

One bot per domain (its 15 intents, their `train` utterances as training phrases), each a real gRPC
server registered in a real etcd; the router (in-process, real gRPC) is calibrated through its API
on `val` + `oos_val` + `oos_train` only. Every utterance of the reported split goes through
`Router.Match`; a fixed-seed sample goes end to end through `Bot.Respond` of a bot of another
domain, so that transfers and fallbacks are what is counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mbc.runtime.config import BotConfig, EncoderConfig, RouterConfig, ServerConfig, split_endpoints
from mbc.v1 import bot_pb2, router_pb2

GROUP = "clinc150"
PUBLISHED = [
    ("DialogFlow (paper, test)", 0.908, 0.267),
    ("Rasa (paper, test)", 0.909, 0.312),
    ("BERT fine-tuned (paper, test)", 0.962, 0.523),
    ("MiniLM 1-NN, one threshold (test)", 0.875, 0.471),
]


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
    return domain.replace("_", "-")


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
    if max_domains:
        domains = dict(list(domains.items())[:max_domains])
    if max_intents:
        domains = {d: intents[:max_intents] for d, intents in domains.items()}
    oos_key = f"oos_{split}"
    for key in ("train", "val", "oos_val", split, oos_key):
        if key not in raw:
            raise SystemExit(f"mbc eval: {data} has no {key!r} split")
    bot_of = {intent: bot_id_of(d) for d, intents in domains.items() for intent in intents}
    keep = lambda rows: [(t, i) for t, i in rows if i in bot_of]  # noqa: E731
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
        out.append({
            "id": bot_id_of(domain),
            "display_name": domain.replace("_", " ").title() + " Bot",
            "group": GROUP,
            "collaboration": True,
            "fallback": f"Sorry, I can only help with {domain.replace('_', ' ')}.",
            "intents": [{"name": i, "phrases": list(dict.fromkeys(phrases[i]))} for i in intents if phrases.get(i)],
            "dialogs": [{"intent": i, "responses": [f"[{i}]"]} for i in intents if phrases.get(i)],
        })
    return out


async def run(args) -> dict:
    from bot_server.bot import Bot
    from bot_server.definition import BotDefinition
    from bot_server.server import BotProcess
    from mbc.testing.etcd import LocalEtcd
    from mbc.runtime.channels import ChannelPool
    from mbc.runtime.encoder import Encoder
    from mbc.client.gateway import Conversation
    from router.calibration import Example
    from router.server import RouterProcess

    started = time.monotonic()
    ds = load(args.data, args.domains, args.split, args.max_domains, args.max_intents, args.limit, args.seed)
    progress(f"eval: {len(ds.domains)} bots, {len(ds.bot_of)} intents, {len(ds.train)} training phrases; "
             f"split {args.split}: {len(ds.in_scope)} in scope + {len(ds.oos)} out of scope; "
             f"calibration: {len(ds.calibration)} utterances of val, oos_val, oos_train")
    if args.split == "val":
        progress("eval: NOTE --split val: the router is calibrated on val, so these figures are in-sample for calibration")
    local_etcd = None
    if args.etcd:
        etcd = split_endpoints(args.etcd)
    else:
        local_etcd = LocalEtcd()
        local_etcd.start()
        etcd = (local_etcd.endpoint,)
    encoder = Encoder(EncoderConfig(backend=args.encoder_backend))
    router = None
    bots: dict[str, BotProcess] = {}
    pool = ChannelPool()
    result: dict = {}
    try:
        router = RouterProcess(RouterConfig(etcd_endpoints=etcd, server=ServerConfig(port=0)), encoder=encoder)
        router.core.set_calibration(
            [Example(text, ds.bot_of[intent], intent, GROUP) if intent else Example(text, group=GROUP) for text, intent in ds.calibration]
        )
        t = time.monotonic()
        progress(f"eval: embedding {len(ds.train)} training phrases...")
        await encoder.aencode_phrases([text for text, _ in ds.train])
        # The bots register first and the router starts after them: one training instead of ten.
        started_bots = []
        for data in definitions(ds):
            bot = BotProcess(
                BotConfig(etcd_endpoints=etcd, router_address=router.server.address, server=ServerConfig(port=0), lease_ttl_seconds=5),
                bot=Bot(BotDefinition.from_dict(data)), encoder=encoder,
            )
            bots[bot.bot.bot_id] = bot
            started_bots.append(bot.start())
        await asyncio.gather(*started_bots)
        progress(f"eval: {len(bots)} bots serving and registered ({time.monotonic() - t:.0f}s)")
        await router.start()
        progress("eval: waiting for the router to train and calibrate on all bots...")
        while True:
            models = router.core.models
            model = models.get(GROUP)
            if model is not None and set(model.bots) == set(bots) and model.calibration.get("calibration_examples"):
                break
            await asyncio.sleep(0.5)
        calibration = dict(model.calibration)
        build = {**model.times.as_dict()}
        progress(f"eval: router ready after {time.monotonic() - t:.1f}s: tau={model.tau:.3f} ({calibration.get('method')})")

        # 1. Every utterance of the split through Router.Match over gRPC.
        items = [(text, ds.bot_of[intent], intent) for text, intent in ds.in_scope] + [(text, "", "") for text in ds.oos]
        # A plain channel: the mesh's service config caps Match at 5 s, too short on a loaded machine.
        import grpc

        from mbc.v1 import router_pb2_grpc

        router_channel = grpc.aio.insecure_channel(router.server.address)
        stub = router_pb2_grpc.RouterStub(router_channel)
        errors: Counter = Counter()
        sem = asyncio.Semaphore(args.concurrency)
        done = [0]
        t = time.monotonic()

        async def ask(text: str):
            async with sem:
                try:
                    r = await stub.Match(router_pb2.MatchRequest(text=text, group=GROUP, max_candidates=3), timeout=600)
                except grpc.aio.AioRpcError as e:  # counted as a miss, reported
                    errors[f"Match {e.code().name}"] += 1
                    r = router_pb2.MatchResponse()
            done[0] += 1
            if done[0] % 500 == 0:
                progress(f"eval: Match {done[0]}/{len(items)} ({time.monotonic() - t:.0f}s)")
            return r

        responses = await asyncio.gather(*(ask(text) for text, _, _ in items))
        match_seconds = time.monotonic() - t
        n_in = n_oos = right = right_bot = rejected = disamb = disamb_in = disamb_wrong_top = 0
        for (text, bot_id, intent), r in zip(items, responses):
            top = r.candidates[0] if r.candidates else None
            if r.decision == router_pb2.DECISION_DISAMBIGUATE:
                disamb += 1
            if bot_id:
                n_in += 1
                if r.decision == router_pb2.DECISION_ACT and top is not None:
                    right += top.bot_id == bot_id and top.intent == intent
                    right_bot += top.bot_id == bot_id
                elif r.decision == router_pb2.DECISION_DISAMBIGUATE:
                    disamb_in += 1
                    disamb_wrong_top += top is None or top.bot_id != bot_id
            else:
                n_oos += 1
                rejected += r.decision == router_pb2.DECISION_NONE

        # 2. A fixed-seed sample end to end through Respond of a bot of another domain.
        rng = random.Random(args.seed)
        sample = rng.sample(items, min(args.sample, len(items)))
        bot_ids = sorted(bots)
        outcomes: Counter = Counter()
        e2e_right = [0]
        done[0] = 0
        t = time.monotonic()

        async def converse(text: str, bot_id: str, intent: str, entry: str):
            async with sem:
                try:
                    async with Conversation(bots[entry].identity.address, channels=pool, timeout_seconds=600) as chat:
                        r = await chat.send(text)
                except grpc.aio.AioRpcError as e:
                    errors[f"Respond {e.code().name}"] += 1
                    r = bot_pb2.RespondResponse()
            outcomes[bot_pb2.Outcome.Name(r.outcome)] += 1
            if bot_id:
                ok = r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == bot_id and r.match.intent == intent
            else:
                ok = r.outcome == bot_pb2.OUTCOME_FALLBACK
            e2e_right[0] += ok
            done[0] += 1
            if done[0] % 100 == 0:
                progress(f"eval: Respond {done[0]}/{len(sample)}")

        entries = [rng.choice([b for b in bot_ids if b != bot_id] or bot_ids) for _, bot_id, _ in sample]
        await asyncio.gather(*(converse(text, b, i, e) for (text, b, i), e in zip(sample, entries)))
        e2e_seconds = time.monotonic() - t

        # 3. A participant change: one bot leaves; time until the retrained model is in use.
        retrain = None
        if args.retrain_check and len(bots) > 2:
            builds = router.core.builds
            leaving = bot_ids[-1]
            t = time.monotonic()
            await bots.pop(leaving).stop()
            await asyncio.wait_for(router.core.wait_builds(builds + 1), 600)
            after = router.core.models[GROUP]
            retrain = {"bot_left": leaving, "seconds": round(time.monotonic() - t, 2), **after.times.as_dict()}
            progress(f"eval: {leaving} left; the router retrained and recalibrated in {retrain['seconds']}s")

        await router_channel.close()
        result = {
            "split": args.split,
            "encoder_backend": args.encoder_backend,
            "in_sample_calibration": args.split == "val",
            "n_in_scope": n_in,
            "n_oos": n_oos,
            "in_scope_accuracy": round(right / max(n_in, 1), 4),
            "oos_recall": round(rejected / max(n_oos, 1), 4),
            "bot_accuracy": round(right_bot / max(n_in, 1), 4),
            "end_to_end_accuracy": round(e2e_right[0] / max(len(sample), 1), 4),
            "end_to_end_n": len(sample),
            "end_to_end_outcomes": dict(outcomes),
            "disambiguation_rate": round(disamb / max(len(items), 1), 4),
            "disambiguations": disamb,
            "disambiguations_in_scope_top1_wrong_bot": disamb_wrong_top,
            "disambiguations_in_scope": disamb_in,
            "tau": round(model.tau, 4),
            "calibration": calibration,
            "initial_build": build,
            "retrain_on_bot_leaving": retrain,
            "match_seconds": round(match_seconds, 2),
            "match_per_second": round(len(items) / max(match_seconds, 1e-9), 1),
            "end_to_end_seconds": round(e2e_seconds, 2),
            "errors": dict(errors),
            "bots": len(ds.domains),
            "intents": len(ds.bot_of),
            "seconds": round(time.monotonic() - started, 1),
        }
        return result
    finally:
        await pool.close()
        for bot in bots.values():
            await bot.stop()
        if router is not None:
            await router.stop()
        encoder.close()
        if local_etcd:
            local_etcd.stop()


def table(r: dict) -> str:
    rows = [
        f"CLINC150 {r['split']}: {r['bots']} bots, {r['intents']} intents, {r['n_in_scope']} in scope + {r['n_oos']} out of scope"
        + ("  [in-sample: the router was calibrated on val]" if r["in_sample_calibration"] else ""),
        f"  {'in_scope_accuracy':<24} {r['in_scope_accuracy']:.4f}   (right bot and intent, acted on; target >= 0.93)",
        f"  {'oos_recall':<24} {r['oos_recall']:.4f}   (out of scope that got a fallback; target >= 0.55)",
        f"  {'bot_accuracy':<24} {r['bot_accuracy']:.4f}   (right bot, acted on; target >= 0.98)",
        f"  {'end_to_end_accuracy':<24} {r['end_to_end_accuracy']:.4f}   (Respond on a bot of another domain, n={r['end_to_end_n']})",
        f"  {'disambiguation_rate':<24} {r['disambiguation_rate']:.4f}   ({r['disambiguations']} questions; counted as misses above)",
        f"  {'tau':<24} {r['tau']:.3f}",
        f"  {'seconds':<24} {r['seconds']:.1f}   (Match: {r['match_per_second']}/s)",
        "",
        f"  {'published (test split)':<36} {'in-scope':>8} {'oos rec':>8}",
    ]
    rows += [f"  {name:<36} {a:8.3f} {o:8.3f}" for name, a, o in PUBLISHED]
    rows.append(f"  {'mbc (this run, ' + r['split'] + ')':<36} {r['in_scope_accuracy']:8.3f} {r['oos_recall']:8.3f}")
    return "\n".join(rows)


def main(args) -> int:
    from mbc.runtime.logs import configure

    configure(args.log_level, service="eval")
    try:
        result = asyncio.run(run(args))
    except DataError as e:
        print(f"mbc eval clinc150: {e}", file=sys.stderr)
        return 2
    print(table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0
