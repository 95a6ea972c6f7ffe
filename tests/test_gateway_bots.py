"""Gateways address bots, not instances (issue 15, item 6): the owner record names the bot, a
router locates its live instances, the Python gateway sends to a sibling when the owner instance
dies, and a transfer retried on another instance of the receiver is applied once.

The example mesh with a second instance of `cards`, on a long lease: an instance killed here stays
registered for LEASE_TTL seconds, the window in which gateways used to get FAILED_PRECONDITION or
the entry bot."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from faultlib import logged
from mbc.client.gateway import Conversation
from mbc.runtime.channels import open_channel
from mbc.testing.mesh import EXAMPLE_BOTS, EXAMPLES, eventually, start_local
from mbc.v1 import bot_pb2, router_pb2, router_pb2_grpc
from meshlib import respond, transfer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

LEASE_TTL = 30
"""Long: the sibling must answer well before the killed instance's registration expires."""
CARDS = ("cards", "cards-2")
START_TIMEOUT = 900.0
"""Seconds a component may take to serve, and the router to index the bots: generous, as the
machine these tests share may be loaded far beyond its cores."""


@pytest.fixture(scope="module")
async def mesh(etcd_server, tmp_path_factory):
    async with start_local(
        EXAMPLE_BOTS,
        workdir=tmp_path_factory.mktemp("gateway-bots"),
        etcd=etcd_server.endpoint,
        lease_ttl=LEASE_TTL,
        start_timeout=START_TIMEOUT,
        index_timeout=START_TIMEOUT,
    ) as mesh:
        await mesh.start_bot(EXAMPLES / "cards.yaml", "cards-2")
        await eventually(lambda: _instances_located(mesh, 2), timeout=30, interval=0.2)
        yield mesh


async def locate(mesh, bot_id: str, group: str = "") -> router_pb2.LocateResponse:
    async with open_channel(mesh.router.address) as channel:
        return await router_pb2_grpc.RouterStub(channel).Locate(router_pb2.LocateRequest(group=group, bot_id=bot_id), timeout=10)


async def _instances_located(mesh, count: int) -> bool:
    return len((await locate(mesh, "cards", "retail-bank")).instances) == count


def _runs(mesh, transfer_id: str) -> tuple[int, int]:
    """(dialogs run, retries answered from the owner record) for `transfer_id`, over both cards instances."""
    ran = sum(1 for name in CARDS for e in logged(mesh.bots[name], "answered") if e.get("transfer_id") == transfer_id)
    replayed = sum(
        1 for name in CARDS for e in logged(mesh.bots[name], "transfer_already_applied") if e.get("transfer_id") == transfer_id
    )
    return ran, replayed


async def _conversation_of(mesh, text: str) -> str:
    """A new conversation that personal banking answered `text` in."""
    conversation = uuid.uuid4().hex
    await respond(mesh.bots["personal-banking"].address, text, conversation)
    return conversation


async def test_the_owner_record_names_the_bot_with_its_group(mesh, store):
    r = await respond(mesh.bots["personal-banking"].address, "I lost my debit card")
    assert r.owner.bot_id == "cards" and r.owner.group == "retail-bank"
    ownership, _ = await store.get_owner(await _conversation_of(mesh, "what's my checking balance"))
    assert ownership.owner.bot_id == "personal-banking" and ownership.owner.group == "retail-bank"


async def test_locate_names_every_live_instance_in_turn(mesh):
    addresses = {mesh.bots[name].address for name in CARDS}
    first = await locate(mesh, "cards", "retail-bank")
    assert {i.address for i in first.instances} == addresses
    assert all(i.bot_id == "cards" and i.group == "retail-bank" and i.instance_id for i in first.instances)
    # The group may be left out when one group has the bot; the order turns on each call.
    second = await locate(mesh, "cards")
    assert {i.address for i in second.instances} == addresses
    assert first.instances[0].address != second.instances[0].address


@pytest.mark.parametrize(
    ("bot_id", "group", "code", "words"),
    [
        ("", "retail-bank", grpc.StatusCode.INVALID_ARGUMENT, "bot_id is required"),
        ("no such bot!", "retail-bank", grpc.StatusCode.INVALID_ARGUMENT, "is invalid"),
        ("cards", "bad group/", grpc.StatusCode.INVALID_ARGUMENT, "group 'bad group/' is invalid"),
        ("nobody", "retail-bank", grpc.StatusCode.NOT_FOUND, "no bot 'nobody' is known in group 'retail-bank'"),
        ("cards", "another-group", grpc.StatusCode.NOT_FOUND, "no bot 'cards' is known in group 'another-group'"),
    ],
)
async def test_locate_refuses_bad_and_unknown_names(mesh, bot_id, group, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await locate(mesh, bot_id, group)
    assert err.value.code() == code and words in err.value.details()


async def _transfer_to_cards(store, conversation: str, text: str, intent: str) -> dict:
    """The fields of a new Transfer of `conversation` to cards, fenced on the owner version now."""
    _, version = await store.get_owner(conversation)
    return dict(
        transfer_id=uuid.uuid4().hex,
        conversation_id=conversation,
        receiver_bot_id="cards",
        text=text,
        intent=intent,
        owner_version=version,
    )


async def test_a_transfer_retried_on_a_sibling_instance_returns_the_first_answer(mesh, store):
    conversation = await _conversation_of(mesh, "what's my checking balance")
    same = await _transfer_to_cards(store, conversation, "I lost my card", "lost_or_stolen_card")
    first = await transfer(mesh.bots["cards"].address, **same)
    ownership, after = await store.get_owner(conversation)
    assert first.outcome == bot_pb2.OUTCOME_ANSWERED and first.owner.address == mesh.bots["cards"].address
    retried = await transfer(mesh.bots["cards-2"].address, **same)
    assert retried == first  # the same replies and owner: the first instance's
    assert (await store.get_owner(conversation))[1] == after  # nothing ran, nothing was written
    assert _runs(mesh, same["transfer_id"]) == (1, 1)
    assert ownership.transfer_id == same["transfer_id"] and ownership.transfer_response == first


async def test_concurrent_retries_on_two_instances_run_the_dialog_once(mesh, store):
    for _ in range(3):
        conversation = await _conversation_of(mesh, "what's my checking balance")
        same = await _transfer_to_cards(store, conversation, "my card got declined at the store", "card_declined")
        results = await asyncio.gather(*(transfer(mesh.bots[name].address, **same) for name in CARDS))
        assert results[0] == results[1] and results[0].outcome == bot_pb2.OUTCOME_ANSWERED
        ownership, _ = await store.get_owner(conversation)
        assert ownership.transfer_id == same["transfer_id"] and ownership.owner.address == results[0].owner.address
        assert _runs(mesh, same["transfer_id"]) == (1, 1)


async def test_owner_instance_killed_its_sibling_answers_the_next_message(mesh, store):
    """Last in this module: it kills an instance of cards."""
    async with Conversation(
        mesh.bots["personal-banking"].address,
        store_address=mesh.store.address,
        router_target=mesh.router.address,
        timeout_seconds=10,
    ) as chat:
        first = await chat.send("I lost my debit card")
        assert first.outcome == bot_pb2.OUTCOME_TRANSFERRED and first.owner.bot_id == "cards"
        owner = next(name for name in CARDS if mesh.bots[name].address == first.owner.address)
        sibling = next(name for name in CARDS if name != owner)
        mesh.bots[owner].kill()
        killed_at = time.monotonic()
        r = await chat.send("my card got declined at the store")
        took = time.monotonic() - killed_at
    print(f"\nsibling answered {took:.2f} s after the owner instance was killed (lease TTL {LEASE_TTL} s)")
    # Answered by the sibling's own dialog: not refused, not handed back through the entry bot.
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.match.intent == "card_declined"
    assert r.replies and {reply.bot_id for reply in r.replies} == {"cards"}
    assert r.owner.address == mesh.bots[sibling].address
    assert took < LEASE_TTL / 3, f"answered {took:.1f} s after the kill"
    ownership, _ = await store.get_owner(chat.conversation_id)
    assert ownership.owner.address == mesh.bots[sibling].address
    taken = logged(mesh.bots["personal-banking"], "conversation_taken_over")
    assert not [e for e in taken if e.get("conversation_id") == chat.conversation_id]
