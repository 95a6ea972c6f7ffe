"""The quality subcommands of `mbc`: eval, calibrate, overlap."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys

from mbc.cli.flags import client_arg, etcd_access, etcd_args, router_decision, router_settings_arg
from mbc.runtime.config import split_endpoints


def cmd_eval(args: argparse.Namespace) -> None:
    from mbc.evaluation.clinc150 import main

    sys.exit(main(args, router_decision(args, "eval")))


def cmd_overlap(args: argparse.Namespace) -> None:
    from mbc.evaluation.overlap import find_overlaps, format_overlaps, intents_from_definitions, intents_from_etcd
    from mbc.runtime.encoder import Encoder

    if args.definitions:
        groups = intents_from_definitions(args.definitions)
    else:
        groups = asyncio.run(intents_from_etcd(list(split_endpoints(args.etcd)), etcd_access(args)))
    encoder = Encoder()
    try:
        overlaps = find_overlaps(groups, encoder, threshold=args.threshold)
    finally:
        encoder.close()
    print(format_overlaps(overlaps, args.examples))
    sys.exit(1 if overlaps and args.fail else 0)


async def _group_costs(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each group's own decision costs in etcd (`mbc group G --costs`), as the routers apply them:
    a group whose stored costs are out of range keeps the routers' (with a warning here too)."""
    from discovery import EtcdClient
    from discovery.groups import read_decision_costs
    from router.calibration import group_cost_overrides

    async with EtcdClient(list(split_endpoints(args.etcd)), access=etcd_access(args)) as client:
        overrides, refused = group_cost_overrides(await read_decision_costs(client))
    for group, error in refused.items():
        print(f"mbc calibrate: group {group}: its costs are ignored, as the routers ignore them: {error}", file=sys.stderr)
    return overrides


async def _store_calibration(args: argparse.Namespace, text: str) -> str:
    from discovery import EtcdClient
    from discovery.calibration import write_calibration

    async with EtcdClient(list(split_endpoints(args.etcd)), access=etcd_access(args)) as client:
        return await write_calibration(client, text)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Validate a calibration file, fit τ per group for the participants registered now, store it
    in etcd for every router replica (and install it as a file). τ is fitted with the routers'
    decision settings (`--config`, MBC_ROUTER__DECISION__*) and, from etcd, each group's own
    costs: the thresholds printed are the ones the routers fit."""
    from discovery.calibration import CalibrationTooLarge
    from mbc.evaluation.overlap import intents_from_definitions, intents_from_etcd
    from mbc.runtime.calibration_set import CalibrationError, dump_calibration, load_calibration
    from mbc.runtime.encoder import Encoder
    from mbc.runtime.matching import IntentCatalog
    from router.calibration import CalibrationInput, build_group_model, for_group, generic_none

    decision = router_decision(args, "calibrate")
    try:
        examples = load_calibration(args.file)
    except CalibrationError as e:
        sys.exit(f"mbc calibrate: {e}")
    none = sum(1 for e in examples if not e.bot_id)
    print(f"{args.file}: {len(examples)} labelled utterances ({none} none-of-these)")
    costs: dict[str, dict[str, float]] = {}
    if args.definitions:
        groups = intents_from_definitions(args.definitions)
    else:
        try:
            groups = asyncio.run(intents_from_etcd(list(split_endpoints(args.etcd)), etcd_access(args)))
            costs = asyncio.run(_group_costs(args))
        except Exception as e:  # noqa: BLE001
            sys.exit(f"mbc calibrate: cannot read the participants and group settings from etcd {args.etcd}: {e}")
    encoder = Encoder()
    fitted = {}
    try:
        generic = generic_none()
        generic_vectors = encoder.encode_phrases(generic)
        for group, intents in sorted(groups.items()):
            if not intents:
                continue
            mine = for_group(examples, group)
            mine_vectors = encoder.encode_phrases([e.text for e in mine])
            data = CalibrationInput(mine, mine_vectors, generic, generic_vectors, costs.get(group, {}))
            vectors = encoder.encode_phrases(IntentCatalog.phrases_of(intents))
            model = build_group_model(intents, vectors, encoder.dim, decision, data)
            fitted[group] = model.calibration
            info = model.calibration
            figures = ", ".join(f"{k} {info[k]}" for k in ("in_scope_accuracy", "bot_accuracy", "none_recall") if k in info)
            print(f"  group {group}: tau {info['tau']:.3f}  ({info['method']})" + (f"; on the set: {figures}" if figures else ""))
    finally:
        encoder.close()
    if args.json:
        print(json.dumps(fitted, indent=2))
    if not args.definitions and not args.dry_run:
        try:
            digest = asyncio.run(_store_calibration(args, dump_calibration(examples)))
        except CalibrationTooLarge as e:
            sys.exit(f"mbc calibrate: {e}")
        except Exception as e:  # noqa: BLE001
            sys.exit(f"mbc calibrate: cannot store the set in etcd {args.etcd}: {e}")
        print(f"stored in etcd {args.etcd} (set {digest}): every router replica refits τ with it within seconds")
    if args.install:
        os.makedirs(os.path.dirname(os.path.abspath(args.install)), exist_ok=True)
        tmp = args.install + ".tmp"
        shutil.copyfile(args.file, tmp)
        os.replace(tmp, args.install)
        print(f"installed as {args.install}: a router started with --calibration {args.install} stores it in etcd within seconds")


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="routing-quality evaluations through a real mesh")
    ev_sub = ev.add_subparsers(dest="dataset", required=True)
    clinc = ev_sub.add_parser("clinc150", help="CLINC150 as a 10-bot mesh (one bot per domain)")
    clinc.add_argument(
        "--data",
        required=True,
        help="clinc150 JSON (keys train, val, oos_train, oos_val[, test, oos_test]), "
        "or the directory holding it as clinc150_public.json",
    )
    clinc.add_argument("--split", choices=["val", "test"], default="val", help="the split to report (default val)")
    clinc.add_argument("--domains", default="", help="domains.json (default: beside --data)")
    clinc.add_argument("--json", default="", help="write the figures to this JSON file")
    clinc.add_argument("--etcd", default="", help="use these etcd endpoints instead of starting a local etcd")
    clinc.add_argument("--sample", type=int, default=300, help="utterances sent end to end through Respond (default 300)")
    clinc.add_argument("--limit", type=int, default=0, help="only this many utterances of the split (a quick slice)")
    clinc.add_argument("--max-domains", type=int, default=0, help="only the first N domains (a quick slice)")
    clinc.add_argument("--max-intents", type=int, default=0, help="only the first N intents per domain (a quick slice)")
    clinc.add_argument("--seed", type=int, default=0)
    clinc.add_argument(
        "--folds",
        type=int,
        default=5,
        help="k of the k-fold figure: tau fitted on k-1 folds of the calibration set, measured on the other (default 5; 0: skip)",
    )
    clinc.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    clinc.add_argument(
        "--encoder-backend",
        default="torch",
        choices=("torch", "onnx", "onnx-int8"),
        help="inference engine of the router and the bots (quality per backend)",
    )
    clinc.add_argument(
        "--no-retrain-check",
        dest="retrain_check",
        action="store_false",
        help="skip timing the retrain when one bot leaves at the end",
    )
    client_arg(clinc, "--log-level", ("log_level",), "WARNING", help="log level of the mesh's processes (default WARNING)")
    router_settings_arg(clinc)
    clinc.set_defaults(func=cmd_eval)

    cal = sub.add_parser(
        "calibrate", help="validate a labelled calibration set, print the thresholds it gives, store it in etcd for the routers"
    )
    cal.add_argument("file", help='JSON Lines: {"text": ..., "bot": ... or null, "intent": ...}')
    etcd_args(cal, help="fit for the participants registered here")
    cal.add_argument("--definitions", nargs="+", default=[], help="fit for these bot definition files instead")
    cal.add_argument("--install", default="", help="also copy the file here (the path given to `mbc router --calibration`)")
    cal.add_argument("--dry-run", action="store_true", help="print the thresholds only; store nothing in etcd")
    cal.add_argument("--json", action="store_true", help="also print the fitted figures as JSON")
    router_settings_arg(cal)
    cal.set_defaults(func=cmd_calibrate)

    ov = sub.add_parser("overlap", help="intents of different bots whose training phrases collide")
    etcd_args(ov, help="the participants registered here")
    ov.add_argument("--definitions", nargs="+", default=[], help="these bot definition files instead (before they join)")
    ov.add_argument("--threshold", type=float, default=0.8, help="cosine from which two phrases collide (default 0.8)")
    ov.add_argument("--examples", type=int, default=2, help="phrase pairs shown per intent pair")
    ov.add_argument("--fail", action="store_true", help="exit with 1 when there is an overlap (for CI)")
    ov.set_defaults(func=cmd_overlap)
