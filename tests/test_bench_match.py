"""The pure computations of `mbc bench match` (mbc/bench/match.py): the router's CPU ratio, the
Respond bound, the bounds' better of two measurements, the targets of issue 18, and the Respond
mesh's definitions and utterances."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbc.bench.match import (
    RESPOND_ROUND_TRIPS,
    BenchOptions,
    RouterRuns,
    best_encoder,
    best_floor,
    respond_bound,
    respond_breakdown,
    respond_definitions,
    respond_phases,
    respond_texts,
    router_cpu_ratio,
    targets,
)

pytestmark = pytest.mark.unit


def phase(server_cpu_ms: float | None, loadgen_cpu_ms: float = 0.3) -> dict:
    cost = {"loadgen_cpu_ms": loadgen_cpu_ms}
    if server_cpu_ms is not None:
        cost["server_cpu_ms"] = server_cpu_ms
    return {"cost_per_call": cost}


def test_router_cpu_ratio_is_router_cpu_over_encoder_and_empty_match_server_cpu() -> None:
    # The figures of the last run in issue 18: 4.984 / (2.804 + 0.35).
    assert router_cpu_ratio(phase(4.984), phase(0.35), 2.804) == pytest.approx(1.58, abs=0.001)
    # The load generator's CPU is in neither side.
    assert router_cpu_ratio(phase(4.984, 9.0), phase(0.35, 9.0), 2.804) == router_cpu_ratio(phase(4.984), phase(0.35), 2.804)


def test_router_cpu_ratio_is_none_without_the_servers_cpu() -> None:
    assert router_cpu_ratio(phase(None), phase(0.35), 2.8) is None
    assert router_cpu_ratio(phase(4.0), phase(None), 2.8) is None
    assert router_cpu_ratio(phase(4.0), phase(0.0), 0.0) is None


def test_respond_bound_adds_the_empty_round_trips_a_transfer_needs() -> None:
    assert RESPOND_ROUND_TRIPS == 6
    assert respond_bound(3.82, 0.82) == pytest.approx(3.82 + 6 * 0.82)
    assert respond_bound(3.0, 1.0, round_trips=2) == 5.0


def result(**changes) -> dict:
    out = {
        "match_qps_c32": 500.0,
        "naive_qps_c32": 60.0,
        "encoder_batch_qps": 760.0,
        "match_p50_ms_c1": 4.5,
        "encoder_single_ms": 2.8,
        "errors": 0,
        "router_cpu_ratio_c32": 1.1,
        "respond_p50_ms_c1": 12.0,
        "bounds": {"match_qps_c32": 580.0, "match_p50_ms_c1": 3.8, "respond_p50_ms_c1": 8.7},
    }
    out.update(changes)
    return out


def test_targets_keep_the_old_ones_and_add_those_against_the_bounds() -> None:
    met = targets(result())
    assert met == {
        "match_qps_c32 >= 4 x naive_qps_c32": True,
        "match_qps_c32 >= 0.85 x encoder_batch_qps": False,
        "match_p50_ms_c1 <= 1.5 x encoder_single_ms": False,
        "errors == 0": True,
        "match_qps_c32 >= 0.85 x bounds.match_qps_c32": True,
        "match_p50_ms_c1 <= 1.25 x bounds.match_p50_ms_c1": True,
        "router_cpu_ratio_c32 <= 1.2": True,
        "respond_p50_ms_c1 <= 1.5 x bounds.respond_p50_ms_c1": True,
    }
    missed = targets(result(match_qps_c32=480.0, match_p50_ms_c1=4.8, router_cpu_ratio_c32=1.21, respond_p50_ms_c1=13.1))
    assert not any(v for k, v in missed.items() if "bound" in k or "ratio" in k)


def test_targets_without_bounds_or_respond_are_the_old_four() -> None:
    bare = result()
    for key in ("bounds", "router_cpu_ratio_c32", "respond_p50_ms_c1"):
        del bare[key]
    assert len(targets(bare)) == 4
    no_respond = result()
    del no_respond["respond_p50_ms_c1"]
    assert not any(k.startswith("respond") for k in targets(no_respond))


def test_respond_definitions_texts_and_phases() -> None:
    domains = {"banking": ["balance", "transfer"], "travel": ["book_flight"]}
    train = {"balance": ["my balance", "how much money"], "transfer": ["send money"], "book_flight": ["fly to paris"]}
    opts = BenchOptions(data_dir=Path(), phrases_per_intent=1, respond_c1_requests=2, respond_c32_requests=5)
    definitions = respond_definitions(domains, train, opts)
    assert sorted(definitions) == ["banking", "travel"]
    banking = definitions["banking"]
    assert banking["group"] == "clinc150" and banking["collaboration"] is True
    assert banking["intents"] == [{"name": "balance", "phrases": ["my balance"]}, {"name": "transfer", "phrases": ["send money"]}]
    assert [d["intent"] for d in banking["dialogs"]] == ["balance", "transfer"]
    labelled = [
        ("what is my balance", "balance"),
        ("a flight to rome", "book_flight"),
        ("a flight to rome", "book_flight"),
        ("hi", "oos"),
    ]
    assert respond_texts(labelled, definitions, "banking") == ["a flight to rome"]
    assert respond_phases(opts, 8) == ["warmup:8:0:8", "respond_c1:1:8:2", "respond_c32:32:10:5"]


def test_respond_breakdown_shares_and_cpu_per_process() -> None:
    def respond_phase(concurrency: int, requests: int, transferred: int) -> dict:
        return {
            "concurrency": concurrency,
            "requests": requests,
            "p50_ms": 10.0,
            "outcomes": {"TRANSFERRED": transferred, "FALLBACK": requests - transferred},
            "transferred": {"requests": transferred},
            "cost_per_call": {"loadgen_cpu_ms": 0.5, "server_cpu_ms": 2.0, "cpu_ms_by_process": {"router": 5.0, "store": 1.0}},
        }

    out = respond_breakdown(respond_phase(1, 10, 9), respond_phase(32, 40, 30))
    assert out["c1"]["transferred_share"] == 0.9 and out["c32"]["transferred_share"] == 0.75
    assert out["c1"]["cpu_ms_per_respond"] == {"entry_bot": 2.0, "router": 5.0, "store": 1.0, "loadgen": 0.5}


def _encoder(single: float, paused: float | None, cpu: float, qps: float, size: int, setup: str) -> dict:
    return {
        "single_ms": single,
        "single_setup": setup,
        "single_after_pause_ms": paused,
        "pause_ms": 0.8 if setup == "a" else 1.7,
        "least_cpu_ms_per_utterance": cpu,
        "batch_qps": qps,
        "batch_cpu_ms_per_utterance": cpu + 0.1,
        "best_batch_size": size,
        "batch_setup": setup,
        "by_setup": {setup: {}},
    }


def test_the_bounds_take_the_better_of_two_measurements() -> None:
    """A bound measured while the neighbours were busy must not flatter a ratio: each figure takes
    the better of the measurements before and after the routers."""
    quiet_batches = _encoder(4.0, 4.4, 3.0, 600.0, 32, "a")
    quiet_singles = _encoder(3.5, None, 3.2, 550.0, 64, "b")
    best = best_encoder(quiet_batches, quiet_singles)
    assert (best["single_ms"], best["single_setup"], best["single_after_pause_ms"]) == (3.5, "b", 4.4)
    assert best["pause_ms"] == 0.8  # the pause that time followed
    assert (best["least_cpu_ms_per_utterance"], best["batch_qps"], best["best_batch_size"]) == (3.0, 600.0, 32)
    assert best["by_setup_after"] == {"b": {}}

    def floor(name: str, p50: float, server_cpu: float) -> dict:
        return {"phase": name, "p50_ms": p50, **phase(server_cpu)}

    runs = RouterRuns(
        floor=[{"phase": "warmup"}, floor("floor_c1", 1.7, 0.5), floor("floor_c32", 0.9, 0.4)],
        floor_after=[{"phase": "warmup"}, floor("floor_after_c1", 0.8, 0.5), floor("floor_after_c32", 0.9, 0.6)],
    )
    c1, c32 = best_floor(runs, 32)
    assert (c1["phase"], c32["phase"]) == ("floor_after_c1", "floor_c32")
    # Measured once (an older JSON's phases): that one.
    assert best_floor(RouterRuns(floor=runs.floor), 32)[0]["phase"] == "floor_c1"
