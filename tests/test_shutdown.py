"""Graceful shutdown, on the session's example mesh (real processes, a real etcd): SIGTERM turns a
server NOT_SERVING at once, a bot's registration leaves etcd at once, the calls in flight finish
with OK, and the process exits within its grace period; with two instances of a bot, stopping one
drops no consumer message."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2

from mbc.testing.etcd import LocalEtcd
from mbc.testing.mesh import eventually
from mbc.testing.processes import ComponentProcess
from mbc.v1 import bot_pb2, context_pb2, context_pb2_grpc, router_pb2, router_pb2_grpc
from meshlib import LEASE_TTL, TEST_BOTS, match, respond
from probes import health, rpcs_started

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

GRACE = 10.0
"""grace_seconds of the servers stopped here: longer than any call in flight."""
SLOW = 3.0
"""How long slowpoke's dialog takes: the calls are certainly in flight when SIGTERM comes."""
TRAVEL_TEXT = "please set a travel notice, I'm going to Japan"
SLOWPOKE_TEXT = "I want to rent a safe deposit box"


@pytest.fixture(scope="module")
def mesh(example_mesh):
    return example_mesh


async def _routed_to(mesh, text: str, asking_bot: str, bot_id: str) -> bool:
    """Whether the router (having indexed the newcomer) gives `text` to `bot_id`. A router that has
    not yet seen the asking bot's registration (it is in etcd already) refuses it: not yet."""
    try:
        r = await match(mesh.router.address, text, bot_id=asking_bot, include_asking_bot=True)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise
    return bool(r.candidates) and r.candidates[0].bot_id == bot_id


async def _registered(etcd_client, bot_id: str) -> int:
    items, _ = await etcd_client.get_prefix(f"/mbc/v1/participants/retail-bank/{bot_id}/")
    return len(items)


async def _not_serving(address: str) -> bool:
    """True once the health check no longer says SERVING (NOT_SERVING, or no answer at all)."""
    return await health(address) != "SERVING"


async def _started_all(component: ComponentProcess, method: str, count: int) -> bool:
    return await rpcs_started(component, method) >= count


async def _sigterm_with_calls_in_flight(
    component: ComponentProcess, method: str, calls: list[asyncio.Task], gone=None, once_not_serving=None
) -> dict:
    """Wait until `component` has begun every call, SIGTERM it, and time what follows: when its
    health stops saying SERVING, when `gone()` (its registration left etcd) holds, its exit.
    `once_not_serving()` runs when its health has turned (e.g. unblocks what the calls wait for)."""
    await eventually(lambda: _started_all(component, method, len(calls)), timeout=60, interval=0.02)
    unfinished = sum(not c.done() for c in calls)
    sent = time.monotonic()
    component.signal(signal.SIGTERM)

    async def seconds_until(check, timeout: float) -> float:
        await eventually(check, timeout=timeout, interval=0.05)
        return time.monotonic() - sent

    probes = [seconds_until(lambda: _not_serving(component.address), GRACE)]
    if gone is not None:
        probes.append(seconds_until(gone, LEASE_TTL))
    seconds = await asyncio.gather(*probes)
    if once_not_serving is not None:
        once_not_serving()
    still_running = sum(not c.done() for c in calls)
    results = await asyncio.gather(*calls, return_exceptions=True)
    code = await asyncio.to_thread(component.process.wait, GRACE + 20)
    return {
        "unfinished_at_sigterm": unfinished,
        "not_serving_s": seconds[0],
        "left_s": seconds[1] if gone else None,
        "still_running_after_probes": still_running,
        "results": results,
        "exit_code": code,
        "exit_s": time.monotonic() - sent,
    }


def _errors(results: list) -> list[str]:
    return [
        f"{type(r).__name__}: {getattr(r, 'code', lambda: '')()} {getattr(r, 'details', lambda: '')()}"
        for r in results
        if isinstance(r, BaseException)
    ]


async def test_sigterm_bot_leaves_at_once_and_finishes_calls_in_flight(mesh, etcd_client):
    bot = await mesh.start_bot(
        TEST_BOTS / "slowpoke.yaml",
        "slowpoke-drain",
        "--handlers",
        str(TEST_BOTS / "slowpoke_handlers.py"),
        env={"SLOWPOKE_SECONDS": str(SLOW), "MBC_BOT__SERVER__GRACE_SECONDS": str(GRACE)},
    )
    try:
        await eventually(lambda: _registered(etcd_client, "slowpoke"), timeout=10)
        await eventually(lambda: _routed_to(mesh, SLOWPOKE_TEXT, "slowpoke", "slowpoke"), timeout=120)
        calls = [asyncio.create_task(respond(bot.address, SLOWPOKE_TEXT, timeout=60)) for _ in range(4)]

        async def gone():
            return await _registered(etcd_client, "slowpoke") == 0

        outcome = await _sigterm_with_calls_in_flight(bot, "Respond", calls, gone)
    finally:
        mesh.bots.pop("slowpoke-drain").terminate()
    print(
        f"bot SIGTERM: NOT_SERVING after {outcome['not_serving_s']:.2f}s, lease gone after {outcome['left_s']:.2f}s, "
        f"{outcome['still_running_after_probes']} of 4 calls still running then, exit after {outcome['exit_s']:.2f}s"
    )
    assert outcome["unfinished_at_sigterm"] == 4, "the calls must still be running when SIGTERM comes"
    assert outcome["not_serving_s"] < 2.0, outcome
    # The registration is gone long before the lease could expire, while the calls still run.
    assert outcome["left_s"] < LEASE_TTL and outcome["still_running_after_probes"] > 0, outcome
    assert not _errors(outcome["results"]), _errors(outcome["results"])
    assert [(r.outcome, r.replies[-1].text) for r in outcome["results"]] == [
        (bot_pb2.OUTCOME_ANSWERED, "Safe deposit boxes start at $60 a year.")
    ] * 4
    assert outcome["exit_code"] == 0 and outcome["exit_s"] <= GRACE + 5, outcome
    assert await _registered(etcd_client, "slowpoke") == 0


async def test_stopping_one_of_two_instances_drops_no_consumer_message(mesh):
    """A gateway keeps sending messages that the entry bot hands over to `travel`, which runs as
    two instances; one of them gets SIGTERM midway. Every message is answered by travel."""
    first = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel-a", env={"MBC_BOT__SERVER__GRACE_SECONDS": str(GRACE)})
    second = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel-b")
    answers: list[tuple[float, object]] = []
    stop = asyncio.Event()

    async def both_instances_routed():
        tops = [(await match(mesh.router.address, TRAVEL_TEXT, bot_id="cards")).candidates[:1] for _ in range(4)]
        return {c.address for top in tops for c in top if c.bot_id == "travel"} == {first.address, second.address}

    async def gateway():
        while not stop.is_set():
            try:
                answers.append((time.monotonic(), await respond(mesh.bots["cards"].address, TRAVEL_TEXT, timeout=30)))
            except grpc.aio.AioRpcError as e:
                answers.append((time.monotonic(), e))

    try:
        await eventually(both_instances_routed, timeout=120)
        gateways = [asyncio.create_task(gateway()) for _ in range(3)]
        await eventually(lambda: _answered_by(answers, first.address), timeout=30)
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.process.wait, GRACE + 20) == 0
        exited = time.monotonic()
        await eventually(lambda: _answered_after(answers, exited, 6), timeout=60)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*gateways), 60)
    finally:
        stop.set()
        for name in ("travel-a", "travel-b"):
            mesh.bots.pop(name).terminate()
    failed = [
        (at, r)
        for at, r in answers
        if isinstance(r, BaseException) or r.outcome != bot_pb2.OUTCOME_TRANSFERRED or r.owner.bot_id != "travel"
    ]
    print(f"two instances, one stopped: {len(answers)} messages, {len(failed)} not answered by travel")
    assert not failed, failed[:3]
    assert {r.owner.address for at, r in answers if at > exited} == {second.address}


async def test_a_killed_instance_still_in_the_routers_view_costs_no_message(mesh):
    """travel runs as two instances; one is SIGKILLed. Until its lease expires the router still
    names it in turn, and a transfer there fails UNAVAILABLE: the entry bot asks the router again
    and hands over to the live instance. Every message is answered by travel, none falls back."""
    dead = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel-dead")
    live = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel-live")
    try:

        async def both_instances_routed():
            tops = [(await match(mesh.router.address, TRAVEL_TEXT, bot_id="cards")).candidates[:1] for _ in range(4)]
            return {c.address for top in tops for c in top if c.bot_id == "travel"} == {dead.address, live.address}

        await eventually(both_instances_routed, timeout=120)
        dead.kill()
        killed = time.monotonic()
        answers = [await respond(mesh.bots["cards"].address, TRAVEL_TEXT, timeout=30) for _ in range(4)]
        assert time.monotonic() - killed < LEASE_TTL, "the lease expired before the messages: nothing was tested"
    finally:
        for name in ("travel-dead", "travel-live"):
            mesh.bots.pop(name).terminate()
    assert [(r.outcome, r.owner.bot_id, r.owner.address) for r in answers] == [
        (bot_pb2.OUTCOME_TRANSFERRED, "travel", live.address)
    ] * 4


async def _answered_by(answers: list, address: str) -> bool:
    return any(not isinstance(r, BaseException) and r.owner.address == address for _, r in answers)


async def _answered_after(answers: list, moment: float, count: int) -> bool:
    return sum(at > moment for at, _ in answers) >= count


async def test_sigterm_router_finishes_matches_in_flight(mesh):
    router = ComponentProcess(
        "router-drain", ["router", "--etcd", mesh.etcd], mesh.workdir, env={"MBC_ROUTER__SERVER__GRACE_SECONDS": str(GRACE)}
    )
    try:
        await router.wait_serving(timeout=180)

        async def indexed():
            return (await match(router.address, "I lost my debit card", group="retail-bank")).candidates

        await eventually(indexed, timeout=60)
        # Distinct long utterances: each costs a full encode, so the batch takes a while.
        words = "please tell me about my card and my account and the fees and the limits " * 4
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            calls = [
                asyncio.ensure_future(stub.Match(router_pb2.MatchRequest(text=f"{i} {words}", group="retail-bank"), timeout=60))
                for i in range(32)
            ]
            outcome = await _sigterm_with_calls_in_flight(router, "Match", calls)
    finally:
        router.terminate()
    print(
        f"router SIGTERM: {outcome['unfinished_at_sigterm']} of 32 Matches in flight, NOT_SERVING after "
        f"{outcome['not_serving_s']:.2f}s, exit after {outcome['exit_s']:.2f}s"
    )
    assert outcome["unfinished_at_sigterm"] > 0, "no Match was in flight at SIGTERM"
    assert outcome["not_serving_s"] < 2.0, outcome
    assert not _errors(outcome["results"]), _errors(outcome["results"])
    assert all(r.candidates for r in outcome["results"])
    assert outcome["exit_code"] == 0 and outcome["exit_s"] <= GRACE + 5, outcome


async def test_sigterm_store_finishes_writes_in_flight(tmp_path):
    # The store's own etcd, frozen while the writes arrive: they are surely in flight at SIGTERM
    # (on a quiet machine 200 Sets finish before a metrics scrape sees them all begun).
    with LocalEtcd(tmp_path / "etcd") as etcd:
        store = ComponentProcess(
            "store-drain", ["store", "--etcd", etcd.endpoint], tmp_path, env={"MBC_STORE__SERVER__GRACE_SECONDS": str(GRACE)}
        )
        namespace = "drain-" + uuid.uuid4().hex[:6]
        try:
            await store.wait_serving(timeout=120)
            async with grpc.aio.insecure_channel(store.address) as channel:
                stub = context_pb2_grpc.ContextStoreStub(channel)
                await stub.RegisterNamespace(
                    context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=600), timeout=10
                )
                requests = [
                    context_pb2.SetContextRequest(
                        key=context_pb2.ContextKey(
                            namespace=namespace, scope=context_pb2.SCOPE_CONVERSATION, scope_id=f"c{i}", key="k"
                        ),
                        value=struct_pb2.Value(number_value=i),
                    )
                    for i in range(200)
                ]
                etcd.pause()
                try:
                    calls = [asyncio.ensure_future(stub.Set(r, timeout=60)) for r in requests]
                    outcome = await _sigterm_with_calls_in_flight(store, "Set", calls, once_not_serving=etcd.resume)
                finally:
                    etcd.resume()
        finally:
            store.terminate()
    print(
        f"store SIGTERM: {outcome['unfinished_at_sigterm']} of 200 Sets in flight, NOT_SERVING after "
        f"{outcome['not_serving_s']:.2f}s, exit after {outcome['exit_s']:.2f}s"
    )
    assert outcome["unfinished_at_sigterm"] > 0, "no Set was in flight at SIGTERM"
    assert outcome["not_serving_s"] < 2.0, outcome
    assert not _errors(outcome["results"]), _errors(outcome["results"])
    assert all(r.written for r in outcome["results"])
    assert outcome["exit_code"] == 0 and outcome["exit_s"] <= GRACE + 5, outcome
