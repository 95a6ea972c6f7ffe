#!/usr/bin/env python3
"""Render the measured figures of docs/performance.md from the JSON files in docs/bench/.

Each benchmark has a region in the page, between `<!-- bench:NAME:begin -->` and
`<!-- bench:NAME:end -->`; this script rewrites it as tables built from docs/bench/NAME.json
(and, for some, companion files such as docs/bench/NAME-onnx-int8.json), with the command, the
date and the machine taken from the JSON. The JSON files are what `mbc bench match --json`,
`mbc bench index --json`, `mbc bench mesh --json` and `mbc eval clinc150 --json` write, plus an optional `recorded` object:
{"command", "date", "machine", "source"} (the machine as a sentence; without it the machine
comes from the bench's own `details.machine` or `machine`).

    python scripts/render_bench_docs.py           # rewrite the regions
    python scripts/render_bench_docs.py --check   # exit 1 if the page is stale (CI)

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "performance.md"
BENCH_DIR = ROOT / "docs" / "bench"


# --- helpers ---------------------------------------------------------------------------------


def get(data: dict, path: str) -> Any:
    """`a.b.c` in nested dicts; None when any part is missing."""
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def num(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,}" if digits is None else f"{value:,.{digits}f}"  # as recorded, unless rounded
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return out


def machine(data: dict) -> str:
    recorded = data.get("recorded") or {}
    if recorded.get("machine"):
        return str(recorded["machine"])
    details = get(data, "details.machine")
    if isinstance(details, dict):
        parts = [f"{details.get('nproc', '?')} CPUs"]
        if details.get("cpu"):
            parts.append(str(details["cpu"]))
        if details.get("python"):
            parts.append(f"Python {details['python']}")
        if details.get("load_average"):
            parts.append("load average " + " / ".join(num(float(x), 2) for x in details["load_average"]))
        return ", ".join(parts)
    simple = data.get("machine")
    if isinstance(simple, dict):
        return ", ".join(f"{k} {v}" for k, v in simple.items())
    return "not recorded"


def provenance(data: dict, name: str) -> list[str]:
    recorded = data.get("recorded") or {}
    command = recorded.get("command", "")
    when = recorded.get("date", "date not recorded")
    line = f"From `docs/bench/{name}.json`"
    if command:
        line += f": `{command}`"
    line += f", {when}. **Machine:** {machine(data)}."
    out = [line]
    if recorded.get("source"):
        out += ["", f"Source of the figures: {recorded['source']}."]
    return out


def load(name: str) -> dict | None:
    path = BENCH_DIR / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def fmt(template: str, data: dict, *paths: str) -> str | None:
    """`template` with the values at `paths`; None (the row is left out) when the first is missing."""
    values = [get(data, p) for p in paths]
    if values[0] is None:
        return None
    return template.format(*(num(v) for v in values))


def add(rows: list[list[str]], label: str, value: str | None, *extra: str) -> None:
    if value is not None:
        rows.append([label, value, *extra])


# --- mbc bench match -------------------------------------------------------------------------


def match_rows(d: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    tuned = get(d, "settings.tuned") or {}
    shown = ("backend", "threads", "workers", "max_batch", "query_cache_size")
    add(rows, "tuned router's set-up", ", ".join(f"{k} {v}" for k, v in tuned.items() if k in shown) or None)
    add(rows, "in-process encoder: one utterance, ms (`encoder_single_ms`)", fmt("{}", d, "encoder_single_ms"))
    batch = fmt("{}", d, "encoder_batch_qps")
    if batch is not None and d.get("encoder_best_batch_size"):
        batch += f" (batches of {d['encoder_best_batch_size']})"
    add(rows, "in-process encoder: best batch, utterances/s (`encoder_batch_qps`)", batch)
    add(rows, "naive router, 32 callers, Matches/s (`naive_qps_c32`)", fmt("{}", d, "naive_qps_c32"))
    add(rows, "**tuned router, 32 callers, Matches/s (`match_qps_c32`)**", fmt("**{}**", d, "match_qps_c32"))
    add(
        rows,
        "tuned router, 1 caller: p50 / p99 ms (`match_p50_ms_c1`, `match_p99_ms_c1`)",
        fmt("{} / {}", d, "match_p50_ms_c1", "match_p99_ms_c1"),
    )
    add(rows, "tuned router, 32 callers: p99 ms (`match_p99_ms_c32`)", fmt("{}", d, "match_p99_ms_c32"))
    add(rows, "errors", fmt("{}", d, "errors"))
    add(rows, "floor: empty Match, 1 caller, p50 ms", fmt("{}", d, "floor.p50_ms_c1"))
    add(rows, "floor: CPU ms per empty Match at 32 callers (server + load generator)", fmt("{}", d, "floor.cpu_ms_per_call_c32"))
    add(
        rows,
        "1 caller: encode / score / whole Match, ms (means)",
        fmt("{} / {} / {}", d, "breakdown.c1.encode_ms", "breakdown.c1.score_ms", "breakdown.c1.mean_ms"),
    )
    add(
        rows,
        "32 callers: CPU ms per Match (router + load generator)",
        fmt("{} ({} + {})", d, "breakdown.c32.cpu_ms_per_match", "breakdown.c32.router_cpu_ms", "breakdown.c32.loadgen_cpu_ms"),
    )
    add(rows, "32 callers: utterances per batch", fmt("{}", d, "breakdown.c32.utterances_per_batch"))
    add(rows, "encoder: one utterance after a pause of the floor's p50, ms", fmt("{}", d, "bounds.encoder_single_after_pause_ms"))
    add(rows, "encoder: least CPU ms per utterance in batches ≤ 32", fmt("{}", d, "bounds.encoder_cpu_ms_per_utterance"))
    add(
        rows,
        "router CPU per Match over (encoder + empty Match) CPU, 32 callers (`router_cpu_ratio_c32`)",
        fmt("{}", d, "router_cpu_ratio_c32"),
    )
    add(
        rows,
        "Respond that transfers: p50 ms at 1 caller / p99 ms at 32 (`respond_p50_ms_c1`, `respond_p99_ms_c32`)",
        fmt("{} / {}", d, "respond_p50_ms_c1", "respond_p99_ms_c32"),
    )
    add(
        rows,
        "**bound: `respond_p50_ms_c1`** (the Match bound and the empty round trips of a transfer)",
        fmt("{}", d, "bounds.respond_p50_ms_c1"),
    )
    bounds = d.get("bounds") or {}
    for key, ratio, unit, label in (
        (
            "match_qps_c32",
            "match_qps_c32 / encoder_batch_qps",
            "× encoder",
            "**bound: `match_qps_c32`** (no router could beat it here)",
        ),
        ("match_p50_ms_c1", "match_p50_ms_c1 / encoder_single_ms", "× single", "**bound: `match_p50_ms_c1`**"),
    ):
        if ratio in bounds:
            value = f"{num(bounds[ratio])} {unit}"
            add(rows, label, f"{num(bounds[key])} = {value}" if key in bounds else value)
    return rows


def match_targets(d: dict) -> list[list[str]]:
    enc, single = d.get("encoder_batch_qps"), d.get("encoder_single_ms")
    qps, p50, naive = d.get("match_qps_c32"), d.get("match_p50_ms_c1"), d.get("naive_qps_c32")
    measured = {
        "match_qps_c32 >= 4 x naive_qps_c32": f"{num(qps / naive, 1)} × naive" if qps and naive else "",
        "match_qps_c32 >= 0.85 x encoder_batch_qps": f"{num(qps / enc, 2)} × encoder" if qps and enc else "",
        "match_p50_ms_c1 <= 1.5 x encoder_single_ms": f"{num(p50 / single, 1)} × single" if p50 and single else "",
        "errors == 0": num(d.get("errors")),
    }
    bounds = d.get("bounds") or {}
    for name, value, bound, unit in (
        ("match_qps_c32 >= 0.85 x bounds.match_qps_c32", qps, bounds.get("match_qps_c32"), "× bound"),
        ("match_p50_ms_c1 <= 1.25 x bounds.match_p50_ms_c1", p50, bounds.get("match_p50_ms_c1"), "× bound"),
        (
            "respond_p50_ms_c1 <= 1.5 x bounds.respond_p50_ms_c1",
            d.get("respond_p50_ms_c1"),
            bounds.get("respond_p50_ms_c1"),
            "× bound",
        ),
    ):
        if value and bound:
            measured[name] = f"{num(value / bound, 2)} {unit}"
    if d.get("router_cpu_ratio_c32") is not None:
        measured["router_cpu_ratio_c32 <= 1.2"] = num(d["router_cpu_ratio_c32"])
    targets = d.get("targets") or {}
    return [[f"`{name}`", measured.get(name, ""), "**met**" if ok else "**not met**"] for name, ok in targets.items()]


def render_match() -> list[str]:
    main = load("match")
    if main is None:
        return ["(docs/bench/match.json is missing)"]
    out = provenance(main, "match") + [""] + table(["figure", "value"], match_rows(main))
    targets = match_targets(main)
    if targets:
        out += ["", "Targets of the run:", ""] + table(["target", "measured", ""], targets)
    int8 = load("match-onnx-int8")
    if int8 is not None:
        out += ["", "With the int8 encoder (`--backend onnx-int8`, same machine):", ""]
        out += provenance(int8, "match-onnx-int8") + [""] + table(["figure", "value"], match_rows(int8))
    return out


# --- mbc bench index -------------------------------------------------------------------------

GB_1_5 = 1536.0  # 1.5 GB, in MiB


def verdict(target: str, ok: bool | None) -> str:
    return "" if ok is None else f"{target}: **{'met' if ok else 'not met'}**"


def index_rows(d: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    add(rows, "vectors in the index", fmt("{}", d, "vectors"), "")
    if d.get("index_type"):
        params = ", ".join(f"{k} {v}" for k, v in (d.get("index_params") or {}).items())
        add(rows, "index type", d["index_type"] + (f" ({params})" if params else ""), "")
    add(rows, "build seconds (train + add)", fmt("{}", d, "build_seconds"), "")
    if d.get("rss_mb") is not None:
        add(
            rows,
            "index process RSS, MiB (before the index / peak while building)",
            fmt("{} ({} / {})", d, "rss_mb", "rss_baseline_mb", "rss_peak_mb"),
            verdict("≤ 1.5 GB", d["rss_mb"] <= GB_1_5),
        )
    if d.get("search_p99_ms") is not None:
        add(
            rows,
            "search p50 / p99 ms (k = 100, one thread, no encoding)",
            fmt("{} / {}", d, "search_p50_ms", "search_p99_ms"),
            verdict("p99 ≤ 5", d["search_p99_ms"] <= 5),
        )
    if d.get("top1_agreement") is not None:
        add(
            rows,
            "top-1 agreement with exact search: id; participant",
            fmt("{}; {}", d, "top1_agreement", "top1_participant_agreement"),
            verdict("≥ 0.99", d["top1_agreement"] >= 0.99),
        )
    if d.get("swap_visible_ms") is not None:
        add(
            rows,
            "replacement visible, ms (slowest swap of 100 phrases, index alone)",
            fmt("{}", d, "swap_visible_ms"),
            verdict("≤ 1,000", d["swap_visible_ms"] <= 1000),
        )
    if d.get("swap_search_p99_ms") is not None:
        ratio = d["swap_search_p99_ms"] / d["steady_search_p99_ms"]
        add(
            rows,
            "search p99 during replacements / steady, ms",
            f"{num(d['swap_search_p99_ms'])} / {num(d['steady_search_p99_ms'])} ({num(ratio, 2)}×)",
            verdict("≤ 2×", ratio <= 2),
        )
    if d.get("restart_ready_seconds") is not None:
        ok = None if (d.get("restart_phrases") or 0) > 100_000 else d["restart_ready_seconds"] <= 10
        add(
            rows,
            "router restart, one group of cached phrases: ready in",
            fmt("{1} s for {0} phrases ({2} encoded)", d, "restart_phrases", "restart_ready_seconds", "restart_encoded"),
            verdict("≤ 10 s at 100k", ok),
        )
    if d.get("router_rss_mb") is not None:
        ok = None if (d.get("restart_phrases") or 0) < 1_000_000 else d["router_rss_mb"] <= GB_1_5
        add(
            rows,
            "router RSS once ready, MiB (model loaded / peak while building)",
            fmt("{} ({} / {})", d, "router_rss_mb", "router_rss_baseline_mb", "router_rss_peak_mb"),
            verdict("≤ 1.5 GB at 1M", ok),
        )
    if d.get("router_swap_visible_ms") is not None:
        add(
            rows,
            "router: a participant registers 100 new phrases, until Match answers one, ms",
            fmt("{}", d, "router_swap_visible_ms"),
            verdict("≤ 1,000", d["router_swap_visible_ms"] <= 1000),
        )
    return rows


def render_index() -> list[str]:
    main = load("index")
    if main is None:
        return ["(docs/bench/index.json is missing)"]
    out = provenance(main, "index") + [""] + table(["figure", "value", "target"], index_rows(main))
    big = load("index-router-1m")
    if big is not None:
        out += ["", "The router with one group of 1M phrases (`--restart-phrases 1000000`):", ""]
        out += provenance(big, "index-router-1m") + [""] + table(["figure", "value", "target"], index_rows(big))
    return out


# --- mbc bench mesh --------------------------------------------------------------------------

MESH_ROWS = (
    ("bots, router replicas, etcd members", "{} / {} / {}", ("bots", "routers", "etcd_members"), None),
    ("groups, bot instances, bot hosts", "{} / {} / {}", ("details.groups", "details.instances", "details.hosts"), None),
    (
        "routers and bots started at once, until every bot is routable on every router, s",
        "**{}**",
        ("seconds_to_all_routable",),
        ("≤ 90 s", "seconds_to_all_routable <= 90"),
    ),
    ("slowest router: spawn to gRPC health SERVING, empty embedding cache, s", "{}", ("router_ready_seconds",), None),
    (
        "RSS of every bot process, MiB (per bot)",
        "**{}** ({})",
        ("bot_rss_mb_total", "bot_rss_mb_per_bot"),
        ("≤ 4 GB", "bot_rss_mb_total <= 4096"),
    ),
    ("largest router RSS, MiB", "{}", ("router_rss_mb",), None),
    ("largest etcd database at the end, MiB", "{}", ("etcd_db_mb",), ("≤ 256 MB", "etcd_db_mb <= 256")),
    ("Respond at 32 conversations: p50 / p99 ms", "{} / {}", ("respond_p50_ms", "respond_p99_ms"), None),
    ("Respond: calls / failed", "{} / {}", ("details.respond.requests", "respond_errors"), None),
    (
        "failed Responds from the router SIGKILL to the host SIGKILL",
        "**{}**",
        ("respond_errors_during_router_kill",),
        ("0", "respond_errors_during_router_kill == 0"),
    ),
    (
        "bot host SIGKILLed until every router dropped its instances, s",
        "**{}**",
        ("killed_bots_gone_seconds",),
        ("≤ lease TTL + 2 s", "killed_bots_gone_seconds <= lease TTL + 2"),
    ),
    ("Match, 32 callers, one surviving router, per second", "{}", ("match_qps_c32",), None),
)


def mesh_rows(d: dict) -> list[list[str]]:
    targets = d.get("targets") or {}
    rows: list[list[str]] = []
    for label, template, paths, target in MESH_ROWS:
        value = fmt(template, d, *paths)
        if value is None:
            continue
        verdict_text = ""
        if target is not None:
            met = next((ok for name, ok in targets.items() if name.startswith(target[1])), None)
            verdict_text = f"{target[0]}: " + ("not measured" if met is None else "**met**" if met else "**not met**")
        rows.append([label, value, verdict_text])
    return rows


def render_mesh() -> list[str]:
    data = load("mesh")
    if data is None:
        return ["(docs/bench/mesh.json is missing)"]
    header = ["figure", "value", "target at 1,000 bots, 3 routers, 3 etcd members"]
    out = provenance(data, "mesh") + [""] + table(header, mesh_rows(data))
    if any((data.get(k) or 0) < n for k, n in (("bots", 1000), ("routers", 3), ("etcd_members", 3))):
        out += ["", "This run is smaller than the scale the targets are set for: its verdicts are for reference only."]
    return out


# --- mbc eval clinc150 -----------------------------------------------------------------------


def pct(value: Any) -> str:
    if value is None:
        return ""
    text = f"{value * 100:.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def render_eval() -> list[str]:
    main = load("eval-clinc150")
    if main is None:
        return ["(docs/bench/eval-clinc150.json is missing)"]
    runs = [("eval-clinc150", main)]
    extra = load("eval-clinc150-onnx-int8")
    if extra is not None:
        runs.append(("eval-clinc150-onnx-int8", extra))
    out: list[str] = []
    for name, data in runs:
        out += provenance(data, name) + [""]
    rows = [
        [
            b["system"],
            pct(b.get("in_scope_accuracy")),
            pct(b.get("oos_recall")),
            pct(b.get("bot_accuracy")),
            "",
            b.get("source", ""),
        ]
        for b in main.get("baselines", [])
    ]
    for name, data in runs:
        split = data.get("split", "?") + (", in-sample τ" if data.get("in_sample_calibration") else "")
        label = f"**mbc router, {data.get('encoder_backend', '?')} ({split})**"
        rows.append(
            [
                label,
                f"**{pct(data.get('in_scope_accuracy'))}**",
                f"**{pct(data.get('oos_recall'))}**",
                f"**{pct(data.get('bot_accuracy'))}**",
                pct(data.get("end_to_end_accuracy")),
                f"`docs/bench/{name}.json`",
            ]
        )
    out += table(["system", "in-scope accuracy %", "out-of-scope recall %", "right bot %", "end to end %", "source"], rows)
    facts = []
    if main.get("n_in_scope") is not None:
        facts.append(
            f"{num(main['n_in_scope'])} in-scope and {num(main.get('n_oos'))} out-of-scope utterances of `{main.get('split')}`"
        )
    if main.get("end_to_end_n"):
        facts.append(f"{num(main['end_to_end_n'])} of them end to end through `Respond` of a bot of another domain")
    if main.get("bots"):
        facts.append(f"{main['bots']} bots, {num(main.get('intents'))} intents")
    if main.get("tau") is not None:
        facts.append(f"τ {num(main['tau'], 3)}")
    if main.get("seconds") is not None:
        facts.append(f"{num(main['seconds'], 0)} s")
    if facts:
        out += ["", "Run of `eval-clinc150.json`: " + "; ".join(facts) + "."]
    return out


# --- the page --------------------------------------------------------------------------------

RENDERERS: dict[str, Callable[[], list[str]]] = {
    "match": render_match,
    "index": render_index,
    "eval-clinc150": render_eval,
    "mesh": render_mesh,
}

NOTICE = "<!-- generated by scripts/render_bench_docs.py from docs/bench/*.json: edit the JSON, not this -->"


def render(page: str) -> tuple[str, list[str]]:
    """The page with every region rewritten, and the names of the regions not found."""
    missing = []
    for name, fn in RENDERERS.items():
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)}:begin -->\n)(.*?)(<!-- bench:{re.escape(name)}:end -->)", re.S)
        match = pattern.search(page)
        if match is None:
            missing.append(name)
            continue
        body = "\n".join([NOTICE, ""] + fn() + [""]) + "\n"
        page = page[: match.start(2)] + body + page[match.end(2) :]
    return page, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/performance.md is stale; change nothing")
    parser.add_argument("--page", type=Path, default=PAGE, help="the page to render (default docs/performance.md)")
    args = parser.parse_args(argv)
    current = args.page.read_text()
    rendered, missing = render(current)
    if missing:
        print(
            f"{args.page}: no region for {', '.join(missing)} (<!-- bench:NAME:begin --> ... <!-- bench:NAME:end -->)",
            file=sys.stderr,
        )
        return 1
    if args.check:
        if rendered != current:
            print(f"{args.page} is stale: run python scripts/render_bench_docs.py", file=sys.stderr)
            return 1
        print(f"{args.page} is current")
        return 0
    if rendered != current:
        args.page.write_text(rendered)
        print(f"rewrote {args.page}")
    else:
        print(f"{args.page} already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
