"""Transfers that lose nothing: ownership in the Context Session Store, fencing, idempotency,
deadlines, loop guard, and data that crosses bots only through the store."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from mbc.client.context import ContextClient, Scope
from mbc.client.gateway import Conversation
from mbc.testing.mesh import eventually, wait_trained
from mbc.v1 import bot_pb2, common_pb2
from meshlib import TEST_BOTS, owner_of, respond, start_example_mesh, transfer

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(300)

SLOW_TEXT = "I'd like to rent a safe deposit box please"


@pytest.fixture(scope="module")
async def mesh(etcd_server, tmp_path_factory):
    async with start_example_mesh(etcd_server.endpoint, tmp_path_factory.mktemp("transfers")) as mesh:
        yield mesh


async def test_the_name_crosses_bots_through_the_store(mesh, store):
    async with Conversation(mesh.bots["personal-banking"].address, store_address=mesh.store.address) as chat:
        question = await chat.send("hello there")
        assert "first name" in question.replies[-1].text
        answer = await chat.send("Priya")
        assert "Priya" in answer.replies[-1].text and answer.owner.bot_id == "personal-banking"
        handed = await chat.send("I run a small bakery and want to open a business account for it")
    assert handed.outcome == bot_pb2.OUTCOME_TRANSFERRED and handed.owner.bot_id == "business-banking"
    assert "Priya" in handed.replies[1].text
    # It is in the store (the transfer itself has no field for it).
    assert (await store.list("retail-bank", Scope.CONVERSATION, chat.conversation_id))["name"] == "Priya"
    assert "name" not in {f.name for f in bot_pb2.TransferRequest.DESCRIPTOR.fields}
    assert await owner_of(store, chat.conversation_id) == "business-banking"


async def test_gateway_replica_finds_the_owner_in_the_store(mesh, store):
    conversation = uuid.uuid4().hex
    async with Conversation(mesh.bots["personal-banking"].address, conversation, store_address=mesh.store.address) as one:
        await one.send("my credit card was stolen")
    # Another gateway replica that knows nothing of this conversation.
    async with Conversation(mesh.bots["personal-banking"].address, conversation, store_address=mesh.store.address) as other:
        r = await other.send("can you also raise my credit limit?")
    assert r.owner.bot_id == "cards" and r.outcome == bot_pb2.OUTCOME_ANSWERED


async def test_concurrent_transfers_of_one_conversation_exactly_one_wins(mesh, store):
    conversation = uuid.uuid4().hex
    first = await respond(mesh.bots["personal-banking"].address, "what's my checking balance", conversation)
    _, version = await store.get_owner(conversation)
    sender = first.owner
    results = await asyncio.gather(
        transfer(
            mesh.bots["cards"].address,
            conversation_id=conversation,
            receiver_bot_id="cards",
            text="I lost my card",
            intent="lost_or_stolen_card",
            sender=sender,
            owner_version=version,
        ),
        transfer(
            mesh.bots["business-banking"].address,
            conversation_id=conversation,
            receiver_bot_id="business-banking",
            text="open a business account",
            intent="open_business_account",
            sender=sender,
            owner_version=version,
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, bot_pb2.TransferResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1
    assert lost[0].code() == grpc.StatusCode.ABORTED and "owned by" in lost[0].details()
    assert await owner_of(store, conversation) == won[0].owner.bot_id


async def test_same_transfer_id_three_times_is_applied_once(mesh, store):
    conversation = uuid.uuid4().hex
    await respond(mesh.bots["personal-banking"].address, "what's my checking balance", conversation)
    _, version = await store.get_owner(conversation)
    same = dict(
        transfer_id=uuid.uuid4().hex,
        conversation_id=conversation,
        receiver_bot_id="cards",
        text="I lost my card",
        intent="lost_or_stolen_card",
        owner_version=version,
    )
    results = await asyncio.gather(*(transfer(mesh.bots["cards"].address, **same) for _ in range(3)))
    assert results[0] == results[1] == results[2]
    ownership, after = await store.get_owner(conversation)
    assert ownership.owner.bot_id == "cards" and ownership.transfer_id == same["transfer_id"]
    # A later retry still gets the same replies, and changes nothing.
    assert await transfer(mesh.bots["cards"].address, **same) == results[0]
    assert (await store.get_owner(conversation))[1] == after


async def test_receiver_killed_mid_transfer_consumer_still_answered(mesh, store):
    slow = await mesh.start_bot(TEST_BOTS / "slowpoke.yaml", "slowpoke", "--handlers", str(TEST_BOTS / "slowpoke_handlers.py"))
    try:
        await eventually(lambda: _candidate_is(mesh, "slowpoke"), timeout=10)
        await wait_trained(mesh.router, 120)  # the group changed: decide with its trained model, not the provisional one
        conversation = uuid.uuid4().hex
        started = time.monotonic()
        reply = asyncio.ensure_future(respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=6))
        # Kill the receiver once it has taken the conversation and is in its dialog.
        await eventually(lambda: _owner_is(store, conversation, "slowpoke"), timeout=4, interval=0.05)
        slow.kill()
        r = await reply
        assert time.monotonic() - started < 6
        assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "cards"
        assert await owner_of(store, conversation) == "cards"
    finally:
        mesh.bots.pop("slowpoke", None)
        slow.kill()


async def test_receiver_too_slow_deadline_still_met(mesh, store):
    await mesh.start_bot(TEST_BOTS / "slowpoke.yaml", "slowpoke-2", "--handlers", str(TEST_BOTS / "slowpoke_handlers.py"))
    try:
        await eventually(lambda: _candidate_is(mesh, "slowpoke"), timeout=10)
        await wait_trained(mesh.router, 120)  # the group changed: decide with its trained model, not the provisional one
        conversation = uuid.uuid4().hex
        started = time.monotonic()
        r = await respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=2.5)
        assert time.monotonic() - started < 2.5
        assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "cards"
        # The receiver finishes its dialog later, but its claim was fenced out: cards keeps it.
        assert await owner_of(store, conversation) == "cards"
        r = await respond(mesh.bots["cards"].address, "my card got declined", conversation)
        assert r.owner.bot_id == "cards"
    finally:
        mesh.bots.pop("slowpoke-2").terminate()


async def test_loop_guard(mesh):
    cards = mesh.bots["cards"].address
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(cards, receiver_bot_id="cards", text="I lost my card", visited_bot_ids=["business-banking", "cards"])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already handled" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(cards, receiver_bot_id="cards", text="I lost my card", hop_count=3)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "maximum 3" in err.value.details()


async def test_loop_between_two_bots_is_cut_with_a_fallback(mesh):
    # cards hands a message over without an intent; business banking finds that it belongs to cards,
    # which already had it: no ping-pong, business banking answers with its fallback.
    r = await transfer(
        mesh.bots["business-banking"].address,
        receiver_bot_id="business-banking",
        text="I lost my debit card",
        sender=common_pb2.BotRef(bot_id="cards"),
        visited_bot_ids=["cards"],
        hop_count=0,
    )
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "business-banking"
    assert [reply.bot_id for reply in r.replies] == ["business-banking"]


async def test_receiver_forwards_a_message_it_cannot_answer(mesh):
    r = await transfer(
        mesh.bots["business-banking"].address,
        receiver_bot_id="business-banking",
        text="I lost my debit card",
        sender=common_pb2.BotRef(bot_id="personal-banking"),
        visited_bot_ids=["personal-banking"],
    )
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED
    assert r.owner.bot_id == "cards" and r.replies[-1].bot_id == "cards"


async def _candidate_is(mesh, bot_id: str) -> bool:
    from meshlib import match

    r = await match(mesh.router.address, SLOW_TEXT, bot_id="cards")
    return bool(r.candidates) and r.candidates[0].bot_id == bot_id


async def _owner_is(store: ContextClient, conversation: str, bot_id: str) -> bool:
    return await owner_of(store, conversation) == bot_id


async def test_return_to_sender_when_configured_for_the_group(mesh, store, etcd_client):
    from discovery.groups import write_group_settings
    from mbc.v1 import participant_pb2

    await write_group_settings(etcd_client, "retail-bank", participant_pb2.GroupSettings(return_to_sender=True))
    try:
        await asyncio.sleep(2.5)  # bots re-read group settings at most every 2 s
        async with Conversation(mesh.bots["personal-banking"].address, store_address=mesh.store.address) as chat:
            r = await chat.send("I think my debit card was stolen")
            assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.replies[-1].bot_id == "cards"
            # The cards dialog ended: the conversation is back with personal banking.
            assert r.owner.bot_id == "personal-banking"
            assert await owner_of(store, chat.conversation_id) == "personal-banking"
            r = await chat.send("what's my checking balance")
            assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.owner.bot_id == "personal-banking"
    finally:
        await write_group_settings(etcd_client, "retail-bank", participant_pb2.GroupSettings())
        await asyncio.sleep(2.5)
    async with Conversation(mesh.bots["personal-banking"].address, store_address=mesh.store.address) as chat:
        r = await chat.send("I think my debit card was stolen")
        assert r.owner.bot_id == "cards"


async def test_ambiguous_message_asks_the_consumer_and_follows_the_answer(mesh, store):
    twin_a = await mesh.start_bot(TEST_BOTS / "twin_a.yaml", "twin-a")
    await mesh.start_bot(TEST_BOTS / "twin_b.yaml", "twin-b")
    try:

        async def both_indexed():
            r = await respond(twin_a.address, "what's the savings APY")
            s = await respond(twin_a.address, "I need a new checkbook")
            return r.owner.bot_id == "twin-a" and s.owner.bot_id == "twin-b"

        await eventually(both_indexed, timeout=30, interval=0.5)
        async with Conversation(twin_a.address, store_address=mesh.store.address) as chat:
            question = await chat.send("I'd like to open an account")
            assert question.outcome == bot_pb2.OUTCOME_CLARIFY and question.owner.bot_id == "twin-a"
            assert {o.bot_id for o in question.options} == {"twin-a", "twin-b", ""}
            assert "Checking Desk" in question.replies[0].text and "None of these" in question.replies[0].text
            answer = await chat.send("the checking desk")
        assert answer.outcome == bot_pb2.OUTCOME_TRANSFERRED and answer.owner.bot_id == "twin-b"
        assert answer.match.intent == "open_account" and "checking desk" in answer.replies[-1].text
        assert await owner_of(store, chat.conversation_id) == "twin-b"

        async with Conversation(twin_a.address) as chat:
            await chat.send("I'd like to open an account")
            none = await chat.send("none of these")
        assert none.outcome == bot_pb2.OUTCOME_FALLBACK and none.owner.bot_id == "twin-a"
    finally:
        for name in ("twin-a", "twin-b"):
            mesh.bots.pop(name).terminate()


async def test_router_down_bots_keep_answering_then_use_it_again(mesh):
    """Last in this module: it replaces the router."""
    from mbc.testing.processes import ComponentProcess

    cards = mesh.bots["cards"].address
    elsewhere = "How do I open a business checking account for my LLC?"
    port = mesh.router.port
    mesh.router.kill()
    # Without the router, a bot still answers its own phrases (matched by words) and falls back for the rest.
    r = await respond(cards, "my card was declined at the store")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.match.intent == "card_declined"
    r = await respond(cards, elsewhere)
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "cards"
    # A router restarted at the same address converges, and the bots use it again without restarting.
    mesh.router = ComponentProcess("router-restarted", ["router", "--etcd", mesh.etcd], mesh.workdir, port=port)
    await mesh.router.wait_serving()

    async def transfers_again():
        return (await respond(cards, elsewhere)).outcome == bot_pb2.OUTCOME_TRANSFERRED

    await eventually(transfers_again, timeout=30, interval=0.5)


def test_match_none_bot_unavailable_becomes_the_groups_unavailable_message():
    """Unit level (pure logic): no router answers NONE_REASON_BOT_UNAVAILABLE yet on this branch,
    so the engine's two steps are tested on a MatchResponse: which bot Match says is unavailable,
    and the reply made of it with the group's message or the default."""
    from bot_server.engine import unavailable_bot
    from discovery.groups import DEFAULT_UNAVAILABLE_MESSAGE, unavailable_message
    from mbc.v1 import participant_pb2, router_pb2

    gone = router_pb2.MatchResponse(
        decision=router_pb2.DECISION_NONE,
        none_reason=router_pb2.NONE_REASON_BOT_UNAVAILABLE,
        unavailable_bot_id="cards",
    )
    assert unavailable_bot(gone) == "cards"
    assert unavailable_bot(router_pb2.MatchResponse(decision=router_pb2.DECISION_NONE)) == ""
    acting = router_pb2.MatchResponse(decision=router_pb2.DECISION_ACT, unavailable_bot_id="cards")
    assert unavailable_bot(acting) == ""
    default = unavailable_message(participant_pb2.GroupSettings(), "Cards Assistant")
    assert default == DEFAULT_UNAVAILABLE_MESSAGE.replace("{bot}", "Cards Assistant")
    assert default == "Cards Assistant is not available right now. Please try again in a few minutes."
    own = participant_pb2.GroupSettings(unavailable_message="Our {bot} team is away; {bot} will be back soon.")
    assert unavailable_message(own, "cards") == "Our cards team is away; cards will be back soon."
