"""`mbc bench mesh`: the plan of the mesh it starts, and a run at the smallest scale."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from mbc.bench.clinc import default_data_dir, load_clinc
from mbc.bench.mesh import command_line, errors_between, participants_in, targets, val_by_intent
from mbc.bench.mesh_plan import PlanError, PlanOptions, group_sizes, plan_mesh

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

pytestmark = pytest.mark.timeout(900)  # the smoke run starts etcd, 2 routers and 4 bots: minutes on loaded cores

KEYS = (
    "bots",
    "routers",
    "etcd_members",
    "seconds_to_all_routable",
    "router_ready_seconds",
    "bot_rss_mb_total",
    "bot_rss_mb_per_bot",
    "router_rss_mb",
    "etcd_db_mb",
    "respond_p50_ms",
    "respond_p99_ms",
    "respond_errors",
    "respond_errors_during_router_kill",
    "killed_bots_gone_seconds",
    "match_qps_c32",
)
"""The JSON keys of the issue's contract (the benchmark is also run from outside)."""


@pytest.fixture(scope="module")
def clinc():
    if not (default_data_dir() / "clinc150_public.json").exists():
        pytest.skip(f"no CLINC150 data at {default_data_dir()} (set MBC_CLINC150)")
    domains, train, _, _ = load_clinc(default_data_dir())
    return domains, train, val_by_intent(default_data_dir())


@pytest.mark.unit
@pytest.mark.parametrize("bots", [1, 15, 16, 46, 1000])
def test_groups_hold_at_most_15_bots_each_with_its_own_intents(clinc, bots):
    plan = plan_mesh(PlanOptions(bots), *clinc)
    sizes = Counter(b.group for b in plan.bots)
    assert len(plan.bots) == bots and len({b.bot_id for b in plan.bots}) == bots
    assert max(sizes.values()) <= 15 and len(sizes) == len(group_sizes(bots, 15)) == -(-bots // 15)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for group in plan.groups:
        intents = [name for b in plan.bots if b.group == group for name, _ in b.intents]
        assert len(intents) == len(set(intents)) == 3 * sizes[group]
    assert all(len(phrases) == 10 for b in plan.bots for _, phrases in b.intents)


@pytest.mark.unit
@pytest.mark.parametrize("bots", [3, 20, 1000])
def test_instances_of_a_bot_are_on_distinct_hosts_and_the_last_host_leaves_every_entry(clinc, bots):
    plan = plan_mesh(PlanOptions(bots), *clinc)
    per_host = Counter(i.host for i in plan.instances)
    assert plan.hosts >= 2 and max(per_host.values()) - min(per_host.values()) <= 1
    for bot in plan.bots:
        hosts = [i.host for i in plan.instances if i.bot_id == bot.bot_id]
        assert len(hosts) == len(set(hosts)) == min(bot.instances, plan.hosts)
    assert any(b.instances == 3 for b in plan.bots) or bots < 6
    last = plan.hosts - 1
    for group in plan.groups:
        entry = plan.entry_bot(group)
        assert entry.instances == 2
        assert any(i.bot_id == entry.bot_id and i.host != last for i in plan.instances)


@pytest.mark.unit
def test_messages_and_match_utterances_are_held_back_from_the_definitions(clinc):
    plan = plan_mesh(PlanOptions(46), *clinc)
    for group in plan.groups:
        phrases = [p for b in plan.bots if b.group == group for _, ps in b.intents for p in ps]
        assert len(phrases) == len(set(phrases))  # so each probe phrase names one bot
        assert plan.messages[group] and not set(plan.messages[group]) & set(phrases)
        assert plan.match_texts[group] and not set(plan.match_texts[group]) & set(phrases)
    first, second = plan.groups[:2]
    shared = {n for b in plan.bots if b.group == first for n, _ in b.intents} & {
        n for b in plan.bots if b.group == second for n, _ in b.intents
    }
    for name in shared:  # one intent in two groups: other utterances, so more phrases to embed cold
        of = [dict(b.intents)[name] for b in plan.bots if name in dict(b.intents)]
        assert of[0] != of[1]


@pytest.mark.unit
def test_a_plan_that_cannot_be_made_names_the_flag(clinc):
    with pytest.raises(PlanError, match="a group of 60 bots needs 180 intents"):
        plan_mesh(PlanOptions(60, bots_per_group=60), *clinc)
    assert len(plan_mesh(PlanOptions(2, bots_per_group=60), *clinc).bots) == 2  # one group of 2 needs 6
    with pytest.raises(PlanError, match="--intents-per-bot"):
        plan_mesh(PlanOptions(2, intents_per_bot=0), *clinc)


@pytest.mark.unit
def test_errors_are_counted_in_the_window_of_a_kill_and_targets_say_what_was_not_measured():
    calls = [(1.0, "OK"), (2.0, "UNAVAILABLE"), (3.0, "DEADLINE_EXCEEDED"), (4.0, "UNAVAILABLE"), (5.0, "OK")]
    assert errors_between(calls, 2.0, 4.0) == 2
    assert errors_between(calls, None, 4.0) is None  # one router: none was killed
    result = {
        "seconds_to_all_routable": 80.0,
        "bot_rss_mb_total": 5000.0,
        "respond_errors_during_router_kill": None,
        "killed_bots_gone_seconds": 11.5,
        "etcd_db_mb": 3.0,
    }
    met = targets(result, lease_ttl=10)
    assert met["seconds_to_all_routable <= 90"] is True
    assert met["bot_rss_mb_total <= 4096"] is False
    assert met["respond_errors_during_router_kill == 0"] is None
    assert met["killed_bots_gone_seconds <= lease TTL + 2 (12)"] is True


@pytest.mark.unit
def test_live_instances_per_group_are_read_from_a_routers_metrics():
    metrics = """# HELP mbc_router_participants Live registered bot instances.
# TYPE mbc_router_participants gauge
mbc_router_participants{group="g000"} 17.0
mbc_router_participants{group="g001"} 16.0
# HELP mbc_router_bots Bots with at least one live instance.
# TYPE mbc_router_bots gauge
mbc_router_bots{group="g000"} 15.0
"""
    assert participants_in(metrics) == {"g000": 17, "g001": 16}


@pytest.mark.unit
def test_the_recorded_command_leaves_out_where_files_went():
    argv = ["bench", "mesh", "--bots", "1000", "--json", "m.json", "--routers", "3", "--workdir=/tmp/w", "--etcd-members", "3"]
    assert command_line(argv) == "mbc bench mesh --bots 1000 --routers 3 --etcd-members 3"


def test_bench_mesh_smallest_run_writes_every_figure(tmp_path, clinc):
    """Two routers (one is killed), three bots (the entry bot twice) on two hosts (one is killed)."""
    out = tmp_path / "mesh.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mbc",
            "bench",
            "mesh",
            "--bots",
            "3",
            "--routers",
            "2",
            "--etcd-members",
            "1",
            "--seconds",
            "24",
            "--match-requests",
            "120",
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ],
        timeout=840,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "seconds_to_all_routable" in done.stdout  # the table
    result = json.loads(out.read_text())
    assert result["recorded"]["command"].startswith("mbc bench mesh --bots 3 --routers 2")
    assert [k for k in KEYS if k not in result] == []
    assert (result["bots"], result["routers"], result["etcd_members"]) == (3, 2, 1)
    assert 0 < result["router_ready_seconds"] <= result["seconds_to_all_routable"]
    assert result["bot_rss_mb_total"] > 0 and result["bot_rss_mb_per_bot"] == pytest.approx(result["bot_rss_mb_total"] / 3, 0.01)
    assert result["router_rss_mb"] > 0 and 0 < result["etcd_db_mb"] < 256
    assert 0 < result["respond_p50_ms"] <= result["respond_p99_ms"]
    respond = result["details"]["respond"]
    assert respond["requests"] > 0 and respond["outcomes"].get("TRANSFERRED", 0) > 0  # the mesh, not one bot
    assert 0 <= result["respond_errors_during_router_kill"] <= result["respond_errors"]
    # Killed at once, gone from the surviving router when the lease (10 s) runs out: not before.
    assert result["killed_bots_gone_seconds"] is not None and 5 < result["killed_bots_gone_seconds"] < 10 + 30
    assert result["details"]["killed_router"] == "router-1" and result["details"]["killed_instances"] == 2
    assert result["match_qps_c32"] > 0 and result["details"]["match_c32"]["errors"] == 0
