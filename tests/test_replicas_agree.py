"""Router replicas that agree (issue 15): each group is trained by its own task, the calibration set
lives in etcd and every replica follows it, and a replica started with an empty cache decides
exactly like one with a warm cache and like one that has been running through changes. Real etcd,
the real model, real registrations; routers as processes (the replicas) or in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from bot_server.bot import Bot
from discovery import EtcdClient, Registration
from discovery.calibration import CHUNK_BYTES, CalibrationTooLarge, read_calibration, split_chunks, write_calibration
from discovery.groups import read_group_settings, write_group_settings
from discovery.keys import CALIBRATION_CURRENT
from mbc.runtime.config import DecisionConfig, RouterConfig, ServerConfig
from mbc.testing.mesh import LocalMesh, eventually, wait_trained
from mbc.v1 import participant_pb2, router_pb2
from meshlib import match, start_router_in_process
from router.server import RouterProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def participant(group: str, bot: str, intents: dict[str, list[str]], port: int = 19100) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        bot_id=bot,
        instance_id=f"{bot}-1",
        address=f"127.0.0.1:{port}",  # never dialled: the router only hands it out
        group=group,
        collaboration=True,
        definition_version="v1",
        intents=[participant_pb2.Intent(name=name, phrases=phrases) for name, phrases in intents.items()],
    )


@contextlib.asynccontextmanager
async def registered(client: EtcdClient, *participants: participant_pb2.Participant):
    registrations = [Registration(client, p, ttl=30) for p in participants]  # long: a loaded machine
    try:
        for registration in registrations:
            await registration.start()
        yield registrations
    finally:
        for registration in registrations:
            await registration.stop(forget=True)


@pytest.fixture(scope="module")
async def client(own_etcd):
    async with EtcdClient([own_etcd.endpoint], timeout=5.0) as etcd:
        yield etcd


# ---------------------------------------------------------------------------------- per group

WORDS = ["account", "card", "loan", "flight", "hotel", "parcel", "invoice", "refund", "order", "ticket", "seat", "payment"]


def _big_intents(count: int, phrases: int) -> dict[str, list[str]]:
    """Many intents of many distinct phrases: a group whose training takes a while."""
    return {
        f"topic_{i}": [f"question {j} about {WORDS[i % len(WORDS)]} {WORDS[j % len(WORDS)]} number {i}" for j in range(phrases)]
        for i in range(count)
    }


@pytest.mark.timeout(1800)
async def test_a_small_groups_change_is_routable_while_a_large_group_trains(own_etcd, client, encoder, tmp_path):
    """A bot of 400 intents joins a group (embedding and training its heads takes a while), then a
    bot joins another, small group: the small group's bot is routable while the large group still
    trains, with the large group's previous model still answering."""
    archive = participant("big", "archive", {"opening_hours": ["when do you open", "opening hours please"]}, 19101)
    small = participant("small", "cards", {"lost_card": ["I lost my debit card", "my card was stolen", "freeze my card"]}, 19102)
    async with registered(client, archive, small):
        router = await start_router_in_process(own_etcd.endpoint, encoder, str(tmp_path))
        try:
            await asyncio.wait_for(router.core.wait_ready(), 600)
            assert set(router.core.models) == {"big", "small"}
            before = router.core.models["big"]
            library = participant("big", "library", _big_intents(400, 11), 19103)
            async with registered(client, library):
                await eventually(lambda: "big" in router.core.training, timeout=60, what="the large group training")
                flights = ["book a flight to Rome", "I need a plane ticket", "find me flights"]
                travel = participant("small", "travel", {"book_flight": flights}, 19104)
                async with registered(client, travel):

                    async def travel_routable() -> bool:
                        response = await match(router.server.address, "I need a plane ticket to Oslo", group="small")
                        return bool(response.candidates) and response.candidates[0].bot_id == "travel"

                    # A Match may wait for a chunk of the large group's phrases on the encoder thread.
                    _, seconds = await eventually(
                        travel_routable, timeout=300, what="travel routable in the small group", retry_on=(grpc.aio.AioRpcError,)
                    )
                    # Before the large group's training ended: its old model still answers.
                    assert "big" in router.core.training, f"the large group finished first ({seconds:.1f}s): nothing was tested"
                    assert router.core.models["big"] is before and "library" not in before.bots

                    async def library_routable() -> bool:
                        response = await match(router.server.address, "question 3 about card loan number 25", group="big")
                        return bool(response.candidates) and response.candidates[0].bot_id == "library"

                    await eventually(
                        library_routable, timeout=1500, interval=1.0, what="library routable", retry_on=(grpc.aio.AioRpcError,)
                    )
                    assert router.core.models["small"].bots == ["cards", "travel"]
        finally:
            await router.stop()


# ---------------------------------------------------------------------------------- replicas

GROUP = "replica-bank"
PROBES = [
    "I lost my debit card",
    "somebody stole my credit card",
    "I want to open a savings account",
    "what is my balance",
    "how do I get a merchant account for my shop",
    "payroll for my employees",
    "book a flight to Rome",
    "I'm going to Spain, will my card work there",
    "what's the weather going to be like tomorrow",
    "tell me a joke",
    "my card was declined at the restaurant",
    "can I increase my credit limit",
    "hello there",
]


def _example_participants() -> list[participant_pb2.Participant]:
    out = []
    for n, path in enumerate(sorted((ROOT / "examples").glob("*.yaml"))):
        definition = Bot.from_file(path).definition
        intents = {i.name: list(i.phrases) for i in definition.intents}
        out.append(participant(GROUP, definition.bot_id, intents, 19200 + n))
    return out


def _travel() -> participant_pb2.Participant:
    definition = Bot.from_file(ROOT / "tests" / "bots" / "travel.yaml").definition
    return participant(GROUP, definition.bot_id, {i.name: list(i.phrases) for i in definition.intents}, 19299)


def _calibration_file(path: Path, none_count: int) -> Path:
    none = [line.strip() for line in (ROOT / "router" / "data" / "generic_none.txt").read_text().splitlines()]
    none = [line for line in none if line and not line.startswith("#")][:none_count]
    labelled = [
        {"text": "my card is gone, I think it was stolen", "bot": "cards"},
        {"text": "I need a card reader for my store", "bot": "business-banking"},
    ]
    path.write_text("".join(json.dumps(item) + "\n" for item in [*({"text": t, "bot": None} for t in none), *labelled]))
    return path


def _calibrate(path: Path, etcd: str) -> str:
    command = [sys.executable, "-m", "mbc", "calibrate", str(path), "--etcd", etcd]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "stored in etcd" in run.stdout, run.stdout
    return run.stdout


def _taus(log: Path) -> dict[str, float]:
    """τ of each group as last built, from a router's log."""
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "group_model_built":
                out[record["group"]] = record["tau"]
    return out


def _logged(log: Path, event: str) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
    return out


async def _answers(address: str) -> list[router_pb2.MatchResponse]:
    return [await match(address, text, group=GROUP, max_candidates=5) for text in PROBES]


async def _answers_at_one_revision(client: EtcdClient, *routers) -> dict[str, list[router_pb2.MatchResponse]]:
    """Each replica's answers, all from the same participant snapshot (the same etcd revision).

    A replica started later lists at a later revision than the others saw an event at (writes to
    keys it does not follow, such as the replicas' own records, move etcd's revision too): a bot
    that registers and leaves in another group gives every replica that same last event."""

    async def collect() -> dict[str, list[router_pb2.MatchResponse]] | None:
        answers = {r.name: await _answers(r.address) for r in routers}
        revisions = {a.index_revision for replies in answers.values() for a in replies}
        if len(revisions) == 1:
            return answers
        async with registered(client, participant("elsewhere", "nudge", {"nudge": ["a message for another group"]})):
            pass
        return None

    return (await eventually(collect, timeout=120, interval=1.0, what="every replica at one etcd revision"))[0]


def _assert_same(a: list[router_pb2.MatchResponse], b: list[router_pb2.MatchResponse], what: str) -> None:
    for text, x, y in zip(PROBES, a, b):
        assert x.decision == y.decision, (what, text, x, y)
        assert [(c.bot_id, c.intent, c.rating, c.matched_phrase) for c in x.candidates] == [
            (c.bot_id, c.intent, c.rating, c.matched_phrase) for c in y.candidates
        ], (what, text)
        for cx, cy in zip(x.candidates, y.candidates):
            assert abs(cx.confidence - cy.confidence) <= 1e-5 and abs(cx.score - cy.score) <= 1e-5, (what, text, cx, cy)


@pytest.mark.timeout(1500)
async def test_replicas_warm_cold_and_running_give_the_same_matches(own_etcd, client, tmp_path):
    """Router A runs while a bot joins and leaves (its group served provisionally, then trained
    without it: with it too if its heads trained before it left); then B starts
    with no cache at all, training everything itself (no work shared), and C with A's cache
    (heads restored, vectors read back). All three give
    the same Match answers (decision, candidates, ratings, confidences and scores to 1e-5) and the
    same τ, fitted from the calibration set stored in etcd by `mbc calibrate`. A new set stored
    while they run is taken by every replica, and they still agree."""
    _calibrate(_calibration_file(tmp_path / "cal1.jsonl", 25), own_etcd.endpoint)
    mesh = LocalMesh(tmp_path / "mesh", own_etcd.endpoint, start_timeout=600)
    mesh.workdir.mkdir()
    cache = tmp_path / "cache-a"
    try:
        async with registered(client, *_example_participants()):
            a = await mesh.start_router("--embedding-cache", str(cache), name="a")
            async with registered(client, _travel()):

                async def travel_first() -> bool:
                    response = await match(a.address, "set a travel notice for Japan", group=GROUP)
                    return bool(response.candidates) and response.candidates[0].bot_id == "travel"

                await eventually(travel_first, timeout=300, interval=0.5, what="travel routable on A")

            async def travel_gone() -> bool:
                response = await match(a.address, "set a travel notice for Japan", group=GROUP, max_candidates=5)
                return all(c.bot_id != "travel" for c in response.candidates)

            await eventually(travel_gone, timeout=60, what="travel gone from A")

            async def rebuilt_without_travel() -> bool:
                models = _logged(a.log_path, "group_model_built")
                return bool(models) and models[-1]["bots"] == 3

            await eventually(rebuilt_without_travel, timeout=300, interval=0.5, what="A retrained without travel")
            await wait_trained(a, 300)  # travel's group is provisional from its arrival until trained without it
            b, c = await asyncio.gather(
                mesh.start_router("--embedding-cache", "off", "--share-work", "off", name="b"),
                mesh.start_router("--embedding-cache", str(cache), name="c"),
            )
            await asyncio.gather(wait_trained(b, 600), wait_trained(c, 600))  # not a provisional model
            assert any(r["how"] == "restored" for r in _logged(c.log_path, "group_model_built"))  # C is warm ...
            assert all(r["how"] == "retrained" for r in _logged(b.log_path, "group_model_built"))  # ... B cold
            answers = await _answers_at_one_revision(client, a, b, c)
            assert any(r.decision == router_pb2.DECISION_ACT for r in answers["a"])
            assert any(r.decision == router_pb2.DECISION_NONE for r in answers["a"])
            _assert_same(answers["a"], answers["b"], "running vs cold")
            _assert_same(answers["a"], answers["c"], "running vs warm")
            taus = [_taus(r.log_path)[GROUP] for r in (a, b, c)]
            assert len(set(taus)) == 1, taus
            for r in (a, b, c):  # τ fitted with the set mbc calibrate stored: its 25 none and 2 labelled
                assert _logged(r.log_path, "group_model_built")[-1]["calibration_examples"] == 27

            # A new set in etcd: every replica refits τ with it, and they still agree.
            _calibrate(_calibration_file(tmp_path / "cal2.jsonl", 60), own_etcd.endpoint)
            stored = await read_calibration(client)
            assert stored is not None

            def loaded_everywhere() -> bool:
                return all(
                    any(r.get("digest") == stored.digest for r in _logged(p.log_path, "calibration_loaded"))
                    and _logged(p.log_path, "group_model_built")[-1].get("calibration_none") == 60
                    for p in (a, b, c)
                )

            await eventually(loaded_everywhere, timeout=300, interval=0.5, what="the new set used by every replica")
            new_taus = [_taus(r.log_path)[GROUP] for r in (a, b, c)]
            assert len(set(new_taus)) == 1 and new_taus != taus, (taus, new_taus)
            answers = await _answers_at_one_revision(client, a, b, c)
            _assert_same(answers["a"], answers["b"], "running vs cold, new set")
            _assert_same(answers["a"], answers["c"], "running vs warm, new set")
    finally:
        mesh.stop()
        await client.delete_prefix("/mbc/v1/calibration/")


async def test_a_calibration_file_seeds_etcd_once_and_later_changes_reach_it(own_etcd, client, encoder, tmp_path):
    """`--calibration FILE` with no set in etcd: the file's set is stored there and used. A router
    started with another file while etcd holds a set uses etcd's, not its file. Writing the file
    (as `mbc calibrate --install` does) stores its new set in etcd."""
    await client.delete_prefix("/mbc/v1/calibration/")
    first = _calibration_file(tmp_path / "first.jsonl", 21)
    other = _calibration_file(tmp_path / "other.jsonl", 22)

    async def start(path: Path) -> RouterProcess:
        config = RouterConfig(
            etcd_endpoints=(own_etcd.endpoint,),
            server=ServerConfig(port=0),
            embedding_cache_dir=str(tmp_path / "cache"),
            decision=DecisionConfig(calibration_path=str(path)),
        )
        process = RouterProcess(config, encoder=encoder)
        process.encoder = type("Shared", (), {"close": lambda self: None})()  # the session's encoder stays open
        await process.start()
        return process

    one = await start(first)
    two = None
    try:
        stored = await read_calibration(client)
        assert stored is not None and len(one.core.calibration) == 23
        assert stored.text == Path(first).read_text()
        two = await start(other)
        assert len(two.core.calibration) == 23  # etcd's set (the first file's), not its own file's 24
        other.write_text(other.read_text())  # touched: "installed" again
        both = lambda: len(one.core.calibration) == len(two.core.calibration) == 24  # noqa: E731
        await eventually(both, timeout=30, what="the file's set everywhere")
    finally:
        for process in (one, two):
            if process is not None:
                await process.stop()
        await client.delete_prefix("/mbc/v1/calibration/")


async def test_a_set_larger_than_an_etcd_request_is_chunked_and_a_huge_one_refused(client):
    text = "".join(json.dumps({"text": f"utterance number {i} " + "x" * 200, "bot": None}) + "\n" for i in range(12_000))
    assert len(text.encode()) > 2 * CHUNK_BYTES  # more than etcd takes in one request
    try:
        digest = await write_calibration(client, text)
        stored = await read_calibration(client)
        assert stored is not None and stored.digest == digest and stored.text == text
        items, _ = await client.get_prefix("/mbc/v1/calibration/sets/")
        assert len(items) == len(split_chunks(text.encode())) >= 3
        assert (await client.get(CALIBRATION_CURRENT)) is not None
        # Replaced: the old chunks are gone.
        await write_calibration(client, '{"text": "hi", "bot": null}\n')
        items, _ = await client.get_prefix("/mbc/v1/calibration/sets/")
        assert len(items) == 1
    finally:
        await client.delete_prefix("/mbc/v1/calibration/")
    with pytest.raises(CalibrationTooLarge, match="bytes; at most"):
        split_chunks(b"x" * (CHUNK_BYTES + 1))


# ------------------------------------------------------------------------- per-group costs

COSTS_INTENTS = {
    "cards": {
        "lost_card": ["I lost my credit card", "my card was stolen", "freeze my card", "block my missing card"],
        "card_declined": ["my card was declined", "why was my payment refused", "the shop refused my card"],
    },
    "travel": {
        "book_flight": ["book a flight to Rome", "I need a plane ticket", "find me flights to Paris"],
        "hotel": ["book a hotel room", "I need a place to stay in Berlin", "reserve a hotel for two nights"],
    },
}


def _group_command(etcd: str, group: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mbc", "group", group, "--etcd", etcd, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def _printed_taus(etcd: str, path: Path, **environ: str) -> dict[str, float]:
    """τ per group as `mbc calibrate FILE --etcd E --dry-run` prints it, with `environ` added."""
    run = subprocess.run(
        [sys.executable, "-m", "mbc", "calibrate", str(path), "--etcd", etcd, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **environ},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return {m[1]: float(m[2]) for m in re.finditer(r"group (\S+): tau (-?[0-9.]+)", run.stdout)}


async def test_a_groups_own_costs_refit_its_tau_alone(own_etcd, client, encoder, tmp_path):
    """`mbc group G --costs wrong_transfer=5` (stored in the group's settings in etcd): the router
    refits G's τ with those costs, without training, and leaves another group's model as it was;
    `--costs default` gives the router's back. A cost out of range is refused by the command
    (exit 2, settings unchanged) and, written to etcd by other means, ignored by the router.
    `mbc calibrate` prints the τ the router fits: with the group's own costs, and with router-wide
    costs from MBC_ROUTER__DECISION__* (the same costs router-wide give the same τ)."""
    groups = ("costs-a", "costs-b")
    parts = [participant(g, bot, intents, 19200 + i) for g in groups for i, (bot, intents) in enumerate(COSTS_INTENTS.items())]
    calibration = [*(f'{{"text": "where is the nearest pizza place {i}", "bot": null}}' for i in range(25))]
    await write_calibration(client, "\n".join(calibration) + "\n")
    calibration_file = tmp_path / "calibration.jsonl"
    calibration_file.write_text("\n".join(calibration) + "\n")
    config = RouterConfig(etcd_endpoints=(own_etcd.endpoint,), server=ServerConfig(port=0), embedding_cache_dir=str(tmp_path))
    router = RouterProcess(config, encoder=encoder)
    router.encoder = type("Shared", (), {"close": lambda self: None})()  # the session's encoder stays open
    core = router.core
    try:
        async with registered(client, *parts):
            await router.start()
            trained = lambda: all(g in core.models and g not in core.provisional for g in groups)  # noqa: E731
            await eventually(trained, timeout=120, what="both groups trained")
            before = {g: core.models[g] for g in groups}

            done = _group_command(own_etcd.endpoint, "costs-a", "--costs", "wrong_transfer=5, oos_share=0.2")
            assert done.returncode == 0, done.stderr
            assert "decision_costs=wrong_transfer=5, oos_share=0.2" in done.stdout
            refitted = lambda: core.models["costs-a"].calibration.get("group_costs") is not None  # noqa: E731
            await eventually(refitted, timeout=60, what="costs-a refitted with its own costs")
            after = core.models["costs-a"]
            assert after.calibration["group_costs"] == {"cost_wrong_transfer": 5.0, "oos_share": 0.2}
            assert after.tau > before["costs-a"].tau and after.W is before["costs-a"].W  # τ alone: no training
            assert core.models["costs-b"] is before["costs-b"]  # not even refitted

            printed = _printed_taus(own_etcd.endpoint, calibration_file)
            assert printed.keys() == set(groups), printed
            assert abs(printed["costs-a"] - after.tau) < 2e-3 and abs(printed["costs-b"] - before["costs-b"].tau) < 2e-3
            dearer = {"MBC_ROUTER__DECISION__COST_WRONG_TRANSFER": "5", "MBC_ROUTER__DECISION__OOS_SHARE": "0.2"}
            router_wide = _printed_taus(own_etcd.endpoint, calibration_file, **dearer)
            assert abs(router_wide["costs-b"] - after.tau) < 2e-3 and abs(router_wide["costs-a"] - after.tau) < 2e-3

            refused = _group_command(own_etcd.endpoint, "costs-a", "--costs", "oos_share=1.5")
            assert refused.returncode == 2 and "oos_share is 1.5" in refused.stderr and "Traceback" not in refused.stderr
            settings = await read_group_settings(client, "costs-a")
            assert settings.decision_costs.oos_share == 0.2  # unchanged

            done = _group_command(own_etcd.endpoint, "costs-a", "--costs", "default")
            assert done.returncode == 0 and "decision_costs=the router defaults" in done.stdout, done.stderr
            back = lambda: "group_costs" not in core.models["costs-a"].calibration  # noqa: E731
            await eventually(back, timeout=60, what="costs-a back to the router's costs")
            assert core.models["costs-a"].tau == before["costs-a"].tau

            bad = participant_pb2.GroupSettings(decision_costs=participant_pb2.DecisionCosts(wrong_transfer=-3))
            await write_group_settings(client, "costs-b", bad)
            done = _group_command(own_etcd.endpoint, "costs-a", "--costs", "clarify=0.5")
            assert done.returncode == 0, done.stderr
            # Every group's settings are read at once: once costs-a has its new costs, costs-b's were read.
            clarify = lambda: core.models["costs-a"].calibration.get("group_costs") == {"cost_clarify": 0.5}  # noqa: E731
            await eventually(clarify, timeout=60, what="costs-a refitted again")
            assert core.models["costs-b"] is before["costs-b"]  # the router's costs, not -3: nothing to refit
    finally:
        await router.stop()
        await client.delete_prefix("/mbc/v1/groups/costs-")
        await client.delete_prefix("/mbc/v1/calibration/")
