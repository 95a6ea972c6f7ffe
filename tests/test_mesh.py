"""The bot tango end to end: a real etcd, the router and bots as separate processes, over gRPC."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from bot_server.state import Awaiting
from mbc.client.context import Scope
from mbc.client.gateway import Conversation
from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2, common_pb2
from meshlib import LEASE_TTL, TEST_BOTS, match, respond, transfer

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def mesh(example_mesh):
    """The example mesh of the session (conftest.py), shared with tests/test_operating.py."""
    return example_mesh


async def test_own_intent_is_answered_locally(mesh):
    r = await respond(mesh.bots["personal-banking"].address, "what's the balance on my checking account?")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED
    assert r.owner.bot_id == "personal-banking"
    assert r.match.rating >= common_pb2.RATING_GOOD
    assert [reply.bot_id for reply in r.replies] == ["personal-banking"] * len(r.replies)


async def test_transfer_carries_message_and_intent_and_moves_ownership(mesh):
    personal = mesh.bots["personal-banking"]
    conversation = uuid.uuid4().hex
    r = await respond(personal.address, "How do I open a business checking account for my LLC?", conversation)
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED
    assert r.owner.bot_id == "business-banking"
    assert r.owner.address == mesh.bots["business-banking"].address
    assert r.match.bot_id == "business-banking" and r.match.rating >= common_pb2.RATING_GOOD
    assert r.transfer_id
    # The sender's transfer message, then the receiver's dialog for the matched intent.
    assert r.replies[0].bot_id == "personal-banking" and "Business Banking Assistant" in r.replies[0].text
    assert r.replies[1].bot_id == "business-banking"

    # The sending bot no longer owns the conversation and says who does.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await respond(personal.address, "thanks", conversation)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "business-banking" in err.value.details()


async def test_an_answer_to_a_clarifying_question_that_picks_no_option_is_routed_anew(mesh, store):
    conversation = uuid.uuid4().hex
    first = await respond(mesh.bots["personal-banking"].address, "what's the balance on my checking account?", conversation)
    assert first.owner.bot_id == "personal-banking"
    # personal-banking asked the consumer which bot they meant (as after an ambiguous message)...
    options = (("business-banking", "payroll", "Business Banking: payroll"), ("", "", "None of these"))
    awaiting = Awaiting(options=options, text="pay my staff")
    await store.set("retail-bank", Scope.CONVERSATION, conversation, "mbc.awaiting.personal-banking", awaiting.to_json())
    # ...and the consumer writes about something else: it is routed as a new message.
    r = await respond(mesh.bots["personal-banking"].address, "I lost my card", conversation)
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "cards"
    assert r.match.intent == "lost_or_stolen_card"


async def test_gateway_follows_the_owner_across_two_transfers(mesh):
    async with Conversation(mesh.bots["personal-banking"].address) as chat:
        first = await chat.send("I want to open a business account for my company")
        second = await chat.send("someone stole my credit card")
        third = await chat.send("what's my checking account balance")
    assert (first.owner.bot_id, second.owner.bot_id, third.owner.bot_id) == ("business-banking", "cards", "personal-banking")
    assert [r.outcome for r in (first, second, third)] == [bot_pb2.OUTCOME_TRANSFERRED] * 3
    assert second.replies[0].bot_id == "business-banking" and second.replies[-1].bot_id == "cards"


async def test_no_capable_bot_gives_the_bots_own_fallback(mesh):
    r = await respond(mesh.bots["cards"].address, "which pizza place delivers the fastest tonight?")
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK
    assert r.owner.bot_id == "cards"
    assert len(r.replies) == 1 and r.replies[0].bot_id == "cards"
    assert "debit and credit cards" in r.replies[0].text


async def test_receiver_with_no_intent_matches_the_message_itself(mesh):
    cards = mesh.bots["cards"].address
    r = await transfer(cards, receiver_bot_id="cards", text="my card got declined at the store")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.match.intent == "card_declined"
    r = await transfer(cards, receiver_bot_id="cards", text="tell me a joke about penguins")
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK and r.owner.bot_id == "cards"


async def test_receiver_runs_the_dialog_of_the_intent_it_was_sent(mesh):
    # The text alone would match another intent: the matched intent decides.
    r = await transfer(mesh.bots["cards"].address, receiver_bot_id="cards", text="my card got declined", intent="activate_card")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.match.intent == "activate_card"


async def test_retried_transfer_is_applied_once(mesh):
    cards = mesh.bots["cards"].address
    same = dict(transfer_id=uuid.uuid4().hex, conversation_id=uuid.uuid4().hex, receiver_bot_id="cards", text="I lost my card")
    results = await asyncio.gather(*(transfer(cards, **same) for _ in range(3)))
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize(
    "call, code, words",
    [
        (lambda m: respond(m.bots["cards"].address, "   "), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        (lambda m: respond(m.bots["cards"].address, "x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "maximum is 2000"),
        (
            lambda m: respond(m.bots["cards"].address, "hi", conversation_id=" "),
            grpc.StatusCode.INVALID_ARGUMENT,
            "conversation_id",
        ),
        (
            lambda m: transfer(m.bots["cards"].address, receiver_bot_id="travel", text="hi"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not 'travel'",
        ),
        (
            lambda m: transfer(m.bots["cards"].address, receiver_bot_id="cards", text="hi", transfer_id=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "transfer_id",
        ),
        (lambda m: match(m.router.address, ""), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        (lambda m: match(m.router.address, "y" * 3000), grpc.StatusCode.INVALID_ARGUMENT, "maximum is 2000"),
        (lambda m: match(m.router.address, "hello", bot_id="no-such-bot"), grpc.StatusCode.NOT_FOUND, "no-such-bot"),
        (
            lambda m: match(m.router.address, "hello", bot_id="cards", group="other"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "retail-bank",
        ),
        (lambda m: match(m.router.address, "hello", max_candidates=1000), grpc.StatusCode.INVALID_ARGUMENT, "max_candidates"),
    ],
    ids=[
        "empty-text",
        "oversized-text",
        "no-conversation",
        "wrong-receiver",
        "no-transfer-id",
        "match-empty",
        "match-oversized",
        "match-unknown-bot",
        "match-wrong-group",
        "match-too-many",
    ],
)
async def test_bad_input_gets_a_clear_status_and_servers_keep_serving(mesh, call, code, words):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(mesh)
    assert err.value.code() == code
    assert words in err.value.details()
    r = await respond(mesh.bots["cards"].address, "I lost my card")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED
    assert (await match(mesh.router.address, "I lost my card")).candidates


async def test_malformed_registration_is_ignored(mesh, etcd_client):
    await etcd_client.put("/mbc/v1/participants/retail-bank/garbage/x1", b"\xff\x00 not a participant")
    try:
        await asyncio.sleep(0.5)
        r = await match(mesh.router.address, "I lost my debit card", group="retail-bank")
        assert r.candidates[0].bot_id == "cards"
        assert "garbage" not in {c.bot_id for c in r.candidates}
    finally:
        await etcd_client.delete("/mbc/v1/participants/retail-bank/garbage/x1")


async def test_non_collaborating_bot_is_never_a_candidate(mesh):
    loner = await mesh.start_bot(TEST_BOTS / "loner.yaml", "loner")
    r = await respond(loner.address, "what's the weather today")
    assert r.outcome == bot_pb2.OUTCOME_ANSWERED
    # It keeps its own fallback rather than transferring, and others never pick it.
    r = await respond(loner.address, "I lost my debit card")
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK
    r = await match(mesh.router.address, "will it rain tomorrow", group="retail-bank", max_candidates=10)
    assert "loner" not in {c.bot_id for c in r.candidates}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(loner.address, receiver_bot_id="loner", text="will it rain")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    mesh.bots.pop("loner").terminate()
    await mesh.forget(mesh.bot_files["loner"].group, mesh.bot_files["loner"].bot_id)  # it left for good


async def test_bot_joining_and_dying_mid_run(mesh):
    router = mesh.router.address

    async def travel_candidate():
        r = await match(router, "set a travel notice for my trip to Japan", bot_id="cards")
        return bool(r.candidates) and r.candidates[0].bot_id == "travel"

    assert not await travel_candidate()
    travel = await mesh.start_bot(TEST_BOTS / "travel.yaml", "travel")
    await eventually(travel_candidate, timeout=10)
    r = await respond(mesh.bots["cards"].address, "please set a travel notice, I'm going to Japan")
    assert r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "travel"

    travel.kill()  # SIGKILL: no deregistration, the lease has to expire
    mesh.bots.pop("travel")
    # For good: without this the router would keep it absent and answer that travel is unavailable.
    await mesh.forget(mesh.bot_files["travel"].group, mesh.bot_files["travel"].bot_id)

    async def gone():
        return not await travel_candidate()

    _, seconds = await eventually(gone, timeout=LEASE_TTL + 2)
    assert seconds <= LEASE_TTL + 2
    # With the only capable bot gone, the asking bot falls back. (Not for a travel notice: cards
    # registered "i'm traveling next week, set a travel notice on my card" under card_declined, and
    # takes it; docs/routing-quality.md, near-domain none-of-these.)
    r = await respond(mesh.bots["cards"].address, "I need yen for my holiday, can you order some")
    assert r.outcome == bot_pb2.OUTCOME_FALLBACK, r.match
