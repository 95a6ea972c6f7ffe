"""Bot ids are unique within a group only: two groups that both run a bot `faq` (plus a bot of their
own), registered under leases in a real etcd, and the router in this process (its etcd watcher, the
real encoder, its gRPC server). Match for each group names that group's instances, never the
other group's `faq`; asking as `faq` works in both groups, and asking as `faq` without a group is
refused as ambiguous rather than guessed."""

from __future__ import annotations

import grpc
import pytest

from discovery import EtcdClient, Registration
from mbc.testing.mesh import eventually
from mbc.v1 import participant_pb2
from meshlib import match, start_router_in_process

pytestmark = pytest.mark.integration

FAQ = (
    "opening_hours",
    ["what are your opening hours", "when are you open", "are you open on sunday", "what time do you close today"],
)
BOTS = {
    # group: {bot: (intent, phrases)}
    "alpha": {
        "faq": FAQ,
        "cards": ("lost_card", ["I lost my credit card", "my card was stolen", "freeze my card", "block my missing debit card"]),
    },
    "beta": {
        "faq": FAQ,
        "travel": (
            "book_flight",
            ["book a flight to Rome", "I need a plane ticket", "find me flights to Paris", "reserve a seat on a plane"],
        ),
    },
}


def _address(group: str, bot: str) -> str:
    # Never dialled: the router only hands addresses out. Distinct per group and bot.
    port = {"alpha": 17000, "beta": 18000}[group] + {"faq": 1, "cards": 2, "travel": 3}[bot]
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
async def router(own_etcd, encoder, tmp_path_factory):
    client = EtcdClient([own_etcd.endpoint], timeout=2.0)
    await client.connect()
    registrations = []
    for group, bots in BOTS.items():
        for bot, (intent, phrases) in bots.items():
            participant = participant_pb2.Participant(
                bot_id=bot,
                instance_id=f"{group}-{bot}-1",
                address=_address(group, bot),
                group=group,
                collaboration=True,
                display_name=f"{bot} of {group}",
                intents=[participant_pb2.Intent(name=intent, phrases=phrases)],
            )
            registrations.append(Registration(client, participant, ttl=5))
    for registration in registrations:
        await registration.start()
    process = await start_router_in_process(own_etcd.endpoint, encoder, str(tmp_path_factory.mktemp("embeddings")))
    try:
        await eventually(
            lambda: set(process.core.models) == {"alpha", "beta"} and not process.core.provisional,
            timeout=120,
            what="both groups trained",
        )
        yield process
    finally:
        await process.stop()
        for registration in registrations:
            await registration.stop()
        await client.close()


async def test_match_of_each_group_names_only_that_groups_bots(router):
    address = router.server.address
    for group, other in (("alpha", "beta"), ("beta", "alpha")):
        own = {_address(group, bot) for bot in BOTS[group]}
        # Without an asking bot: the group's faq answers, at the group's faq instance.
        r = await match(address, "when are you open on sunday?", group=group, max_candidates=5)
        assert r.candidates and r.candidates[0].bot_id == "faq"
        assert r.candidates[0].address == _address(group, "faq")
        assert r.candidates[0].instance_id == f"{group}-faq-1" and r.candidates[0].display_name == f"faq of {group}"
        assert {c.address for c in r.candidates} <= own
        # Asked by the group's faq: accepted (not INVALID_ARGUMENT), its own group's bots only.
        other_bot = next(b for b in BOTS[group] if b != "faq")
        text = "I lost my credit card" if other_bot == "cards" else "book a flight to Rome"
        r = await match(address, text, bot_id="faq", group=group, max_candidates=5)
        assert r.candidates and r.candidates[0].bot_id == other_bot
        assert {c.address for c in r.candidates} <= own - {_address(group, "faq")}
        # Asked by the group's other bot (its group found from its id, unique): the group's faq.
        r = await match(address, "what are your opening hours", bot_id=other_bot, max_candidates=5)
        assert r.candidates and r.candidates[0].bot_id == "faq"
        assert {c.address for c in r.candidates} <= own - {_address(group, other_bot)}
        assert _address(other, "faq") not in {c.address for c in r.candidates}


async def test_an_ambiguous_asking_bot_must_name_its_group(router):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await match(router.server.address, "I lost my credit card", bot_id="faq")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "alpha" in err.value.details() and "beta" in err.value.details() and "group" in err.value.details()
    # A bot in neither group is still unknown; a known bot named with a group it is not in is refused.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await match(router.server.address, "hello", bot_id="nobody", group="alpha")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await match(router.server.address, "hello", bot_id="travel", group="alpha")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "beta" in err.value.details()
