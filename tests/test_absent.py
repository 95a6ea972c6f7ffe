"""Known but absent (issue 16): a bot whose every instance left etcd without being forgotten keeps
its intents in its group's model, and a Match whose best intent is its own answers NONE with
NONE_REASON_BOT_UNAVAILABLE and its id, instead of handing the message to a bot that matches it
less well. Real etcd, real registrations, the router in this process (its watcher, the real
encoder, its gRPC server)."""

from __future__ import annotations

import asyncio
import types

import pytest

from discovery import DefinitionError, EtcdClient, LeaseKeeper, Registration, definition_key, forget_definition
from mbc.testing.mesh import eventually
from mbc.v1 import participant_pb2, router_pb2
from meshlib import match, start_router_in_process
from router.directory import Directory
from router.server import RouterProcess

pytestmark = pytest.mark.integration

GROUP = "absent-bank"
BOTS = {
    "cards": (
        "lost_card",
        ["I lost my debit card", "my card was stolen", "freeze my card", "block my missing credit card", "I can't find my card"],
    ),
    "business-banking": (
        "merchant_services",
        ["take card payments in my shop", "a card terminal for my business", "merchant account fees", "accept cards online"],
    ),
    "travel": (
        "book_flight",
        ["book a flight to Rome", "I need a plane ticket", "find me flights to Paris", "reserve a seat on a plane"],
    ),
}
PROBE = "I lost my debit card"
UNAVAILABLE = router_pb2.NONE_REASON_BOT_UNAVAILABLE


def participant(bot: str, instance: str = "1", version: str = "v1") -> participant_pb2.Participant:
    intent, phrases = BOTS[bot]
    return participant_pb2.Participant(
        bot_id=bot,
        instance_id=f"{bot}-{instance}",
        address=f"127.0.0.1:{19000 + list(BOTS).index(bot)}",  # never dialled: the router only hands it out
        group=GROUP,
        collaboration=True,
        definition_version=version,
        intents=[participant_pb2.Intent(name=intent, phrases=phrases)],
    )


@pytest.fixture(scope="module")
async def client(own_etcd):
    async with EtcdClient([own_etcd.endpoint], timeout=2.0) as etcd:
        yield etcd


async def start_router(own_etcd, encoder, tmp_path_factory) -> RouterProcess:
    process = await start_router_in_process(own_etcd.endpoint, encoder, str(tmp_path_factory.mktemp("embeddings")))
    return process


@pytest.fixture(scope="module")
async def mesh(own_etcd, encoder, client, tmp_path_factory):
    """The three bots registered, and a router that acts on PROBE for cards."""
    registrations = {bot: Registration(client, participant(bot), ttl=5) for bot in BOTS}
    for registration in registrations.values():
        await registration.start()
    router = await start_router(own_etcd, encoder, tmp_path_factory)
    try:
        await eventually(lambda: GROUP in router.core.models and not router.core.provisional, timeout=120, what="group trained")
        result = await router.core.match(PROBE, "", GROUP, 5, 0)
        assert result.decision == router_pb2.DECISION_ACT and result.candidates[0].match.bot_id == "cards", result
        yield types.SimpleNamespace(router=router, registrations=registrations)
    finally:
        await router.stop()
        for registration in registrations.values():
            await registration.stop(forget=True)


async def absent_answer(router: RouterProcess, timeout: float = 30.0) -> router_pb2.MatchResponse:
    """The gRPC Match for PROBE, once the router answers that cards is unavailable."""

    async def unavailable() -> router_pb2.MatchResponse | None:
        response = await match(router.server.address, PROBE, group=GROUP)
        return response if response.none_reason == UNAVAILABLE else None

    return (await eventually(unavailable, timeout=timeout, what="cards unavailable"))[0]


def assert_unavailable(response: router_pb2.MatchResponse) -> None:
    assert response.decision == router_pb2.DECISION_NONE
    assert response.none_reason == UNAVAILABLE
    assert response.unavailable_bot_id == "cards"
    # Never a candidate without an instance, and nothing handed to a bot that matches less well.
    assert all(c.bot_id != "cards" and c.address for c in response.candidates)


async def cards_acts(router: RouterProcess) -> None:
    async def acting() -> bool:
        response = await match(router.server.address, PROBE, group=GROUP)
        return response.decision == router_pb2.DECISION_ACT and response.candidates[0].bot_id == "cards"

    await eventually(acting, timeout=30, what="cards acts again")


async def test_revoked_without_forget_is_unavailable_and_comes_back_without_retraining(mesh, client):
    core = mesh.router.core
    model, builds = core.models[GROUP], core.builds
    await mesh.registrations["cards"].stop()  # lease revoked; the definition stays
    assert await client.get(definition_key(GROUP, "cards")) is not None
    assert_unavailable(await absent_answer(mesh.router))
    assert core.models[GROUP] is model  # neither retrained nor refitted: same model, same τ
    # The same definition comes back: no build either.
    mesh.registrations["cards"] = Registration(client, participant("cards", "2"), ttl=5)
    await mesh.registrations["cards"].start()
    await cards_acts(mesh.router)
    assert core.models[GROUP] is model
    await asyncio.sleep(0.5)  # let any build the changes might have queued happen
    assert core.models[GROUP] is model, f"rebuilt: builds {builds} -> {core.builds}"


async def test_a_draining_bot_asking_for_itself_is_not_told_it_is_unavailable(mesh, client):
    # SIGTERM: a bot deregisters at once and finishes its calls; a Match it makes meanwhile about
    # its own intents must let it answer them, not name it as the unavailable bot.
    await mesh.registrations["cards"].stop()
    await absent_answer(mesh.router)
    response = await match(mesh.router.server.address, PROBE, bot_id="cards", group=GROUP, include_asking_bot=True)
    assert response.decision == router_pb2.DECISION_ACT and response.none_reason == 0, response
    assert response.candidates[0].bot_id == "cards"
    mesh.registrations["cards"] = Registration(client, participant("cards", "drained"), ttl=5)
    await mesh.registrations["cards"].start()
    await cards_acts(mesh.router)


async def test_expired_lease_of_a_killed_instance_is_unavailable(mesh, client):
    # A killed process: the keep-alive stops, nothing is revoked, the lease runs out.
    keeper = LeaseKeeper(client, ttl=2)
    killed = Registration(client, participant("cards", "killed"), lease=keeper)
    await killed.start()
    await mesh.registrations["cards"].stop()
    keeper.abandon()
    response = await absent_answer(mesh.router, timeout=30)
    assert_unavailable(response)
    assert await client.get(killed.key) is None  # gone with its lease, not by a revoke
    mesh.registrations["cards"] = Registration(client, participant("cards", "3"), ttl=5)
    await mesh.registrations["cards"].start()
    await cards_acts(mesh.router)


async def test_a_restarted_router_knows_the_absent_bot(mesh, client, own_etcd, encoder, tmp_path_factory):
    await mesh.registrations["cards"].stop()
    await absent_answer(mesh.router)
    other = await start_router(own_etcd, encoder, tmp_path_factory)
    try:
        await eventually(
            lambda: GROUP in other.core.models and not other.core.provisional, timeout=120, what="group trained by the new router"
        )
        assert_unavailable(await absent_answer(other, timeout=10))
        assert other.core.directory is not None
        assert other.core.directory.find_bot("cards", GROUP).absent
    finally:
        await other.stop()
    mesh.registrations["cards"] = Registration(client, participant("cards", "4"), ttl=5)
    await mesh.registrations["cards"].start()
    await cards_acts(mesh.router)


async def test_forget_removes_the_bot(mesh, client):
    await mesh.registrations["cards"].stop()
    await absent_answer(mesh.router)
    assert await forget_definition(client, GROUP, "cards")

    async def forgotten() -> router_pb2.MatchResponse | None:
        response = await match(mesh.router.server.address, PROBE, group=GROUP)
        return response if response.none_reason != UNAVAILABLE else None

    response, _ = await eventually(forgotten, timeout=60, what="cards forgotten")
    assert not response.unavailable_bot_id
    assert all(c.bot_id != "cards" for c in response.candidates)
    await eventually(
        lambda: "cards" not in mesh.router.core.models[GROUP].bot_of_class,
        timeout=120,
        what="model retrained without cards",
    )
    # And registering again (start writes the definition) brings it back.
    mesh.registrations["cards"] = Registration(client, participant("cards", "5"), ttl=5)
    await mesh.registrations["cards"].start()
    await cards_acts(mesh.router)


async def test_stop_with_forget_deletes_the_definition(client):
    solo = participant("travel", "solo")
    solo.group = "solo"
    registration = Registration(client, solo, ttl=5)
    await registration.start()
    assert await client.get(definition_key("solo", "travel")) is not None
    await registration.stop(forget=True)
    assert await client.get(definition_key("solo", "travel")) is None


def test_an_oversized_definition_is_refused_at_registration():
    huge = participant("cards")
    huge.intents[0].phrases.extend(f"phrase number {i} " * 40 for i in range(2000))
    with pytest.raises(DefinitionError, match="bytes serialized; the maximum is"):
        Registration(types.SimpleNamespace(), huge)  # type: ignore[arg-type]


def test_live_instances_intents_win_over_the_definition():
    definition = participant("cards", version="v1")
    definition.ClearField("instance_id")
    definition.ClearField("address")
    live = participant("cards", version="v2")
    live.intents[0].phrases.append("report a lost card")
    directory = Directory.from_participants(
        {"/p/cards": live},
        2,
        definitions={definition_key(GROUP, "cards"): definition, definition_key(GROUP, "travel"): _def("travel")},
    )
    cards = directory.find_bot("cards", GROUP)
    assert cards is not None and not cards.absent and cards.definition_version == "v2"
    assert "report a lost card" in cards.intents[0].phrases
    travel = directory.find_bot("travel", GROUP)
    assert travel is not None and travel.absent
    assert {i.bot_id for i in directory.candidates_of(GROUP)} == {"cards", "travel"}  # absent intents stay in the model


def _def(bot: str) -> participant_pb2.Participant:
    d = participant(bot)
    d.ClearField("instance_id")
    d.ClearField("address")
    return d
