"""The fault suite: real etcd, store, router and bots as processes, each fault injected for real
(SIGKILL, SIGSTOP, etcd stopped, etcd compacted), each test bounded in time.

The module runs its own etcd (it is stopped and compacted here) and one mesh on it; the etcd
outage comes last. Covered elsewhere: a receiver killed before it answered
(tests/test_transfers.py::test_receiver_killed_mid_transfer_consumer_still_answered) and the router
killed and restarted (tests/test_transfers.py::test_router_down_bots_keep_answering_then_use_it_again).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from bot_server.state import Fenced, MemoryState
from discovery import EtcdClient, Registration
from discovery.groups import DEFAULT_UNAVAILABLE_MESSAGE, GroupSettingsCache, unavailable_message
from discovery.keys import PARTICIPANTS_PREFIX
from faultlib import logged, ranked_first
from mbc.client.context import ContextClient, Scope
from mbc.client.gateway import Conversation
from mbc.testing.mesh import eventually
from mbc.v1 import bot_pb2, common_pb2, participant_pb2
from meshlib import TEST_BOTS, match, owner_of, respond, start_example_mesh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(480),
]  # the first test also starts the mesh: minutes on a loaded machine

GROUP = "retail-bank"
SLOWPOKE = TEST_BOTS / "slowpoke.yaml"
HANDLERS = ("--handlers", str(TEST_BOTS / "fault_handlers.py"))
SLOW_TEXT = "I'd like to rent a safe deposit box please"


@pytest.fixture(scope="module")
async def mesh(own_etcd, tmp_path_factory):
    async with start_example_mesh(own_etcd.endpoint, tmp_path_factory.mktemp("faults")) as mesh:
        yield mesh


@pytest.fixture
async def etcd(own_etcd):
    client = EtcdClient([own_etcd.endpoint], timeout=2.0, heartbeat=1.0)
    await client.connect()
    yield client
    await client.close()


async def reservation(store: ContextClient, conversation: str):
    value, _ = await store.get(GROUP, Scope.CONVERSATION, conversation, "reservation")
    return value


async def start_slowpoke(mesh, name: str, mode: str):
    bot = await mesh.start_bot(SLOWPOKE, name, *HANDLERS, env={"FAULT_MODE": mode, "FAULT_SECONDS": "3"})
    await eventually(lambda: _router_ranks(mesh, "slowpoke"), timeout=30, interval=0.3)
    return bot


async def stop_slowpoke(mesh, name: str) -> None:
    bot = mesh.bots.pop(name)
    bot.signal(signal.SIGCONT)
    bot.kill()
    # Its lease must be gone before the next test routes safe deposit boxes.
    await eventually(lambda: _router_ranks_not(mesh, "slowpoke"), timeout=15, interval=0.3)


async def _router_ranks(mesh, bot_id: str) -> bool:
    return await ranked_first(mesh.router.address, SLOW_TEXT, GROUP) == bot_id


async def _router_ranks_not(mesh, bot_id: str) -> bool:
    return await ranked_first(mesh.router.address, SLOW_TEXT, GROUP) != bot_id


async def test_memory_state_fences_writes_like_the_store():
    state = MemoryState()
    mine = await state.claim("c1", common_pb2.BotRef(bot_id="cards"), 0, "", 1.0)
    await state.set_variable("c1", "topic", "card", mine, 1.0)
    await state.claim("c1", common_pb2.BotRef(bot_id="business-banking"), mine, "", 1.0)
    with pytest.raises(Fenced, match="'business-banking'"):
        await state.set_variable("c1", "topic", "stale", mine, 1.0)
    with pytest.raises(Fenced):
        await state.set_awaiting("c1", None, mine, 1.0)
    assert (await state.variables("c1", 1.0)) == {"topic": "card"}


async def test_receiver_killed_after_answering_consumer_gets_the_answer_of_the_recorded_owner(mesh, store):
    """The receiver takes the conversation, runs its dialog (it writes to the store), and is
    killed before its reply leaves the process: the sender claims the conversation back and
    answers, so the answer the consumer gets and the recorded owner are the same bot."""
    dying = await start_slowpoke(mesh, "slowpoke-dies", "die_after_answer")
    try:
        conversation = uuid.uuid4().hex
        started = time.monotonic()
        r = await respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=8)
        assert time.monotonic() - started < 8
        assert await asyncio.to_thread(dying.process.wait, 10) == -signal.SIGKILL
        # It did answer (its dialog's write is in the store) before it died.
        assert await reservation(store, conversation) == SLOW_TEXT
        assert r.outcome in (bot_pb2.OUTCOME_FALLBACK, bot_pb2.OUTCOME_TRANSFERRED)
        assert "slowpoke" not in {reply.bot_id for reply in r.replies}
        assert r.replies[-1].bot_id == r.owner.bot_id
        assert await owner_of(store, conversation) == r.owner.bot_id
        # The conversation goes on with the recorded owner.
        follow_up = await respond(r.owner.address, "my card got declined at the grocery store", conversation)
        assert follow_up.replies and await owner_of(store, conversation) == follow_up.owner.bot_id
    finally:
        await stop_slowpoke(mesh, "slowpoke-dies")


async def test_owner_killed_between_messages_the_entry_bot_takes_the_conversation_over(mesh, store):
    """The bot that owns a conversation dies; once its registration is gone, the gateway's next
    message (the owner unreachable) goes to the entry bot, which takes the conversation over."""
    owner = await start_slowpoke(mesh, "slowpoke-owner", "slow_write")
    try:
        async with Conversation(mesh.bots["cards"].address, store_address=mesh.store.address, timeout_seconds=20) as chat:
            first = await chat.send(SLOW_TEXT)
            assert first.owner.bot_id == "slowpoke" and chat.owner_address == owner.address
            owner.kill()
            await eventually(lambda: _router_ranks_not(mesh, "slowpoke"), timeout=15, interval=0.3)
            started = time.monotonic()
            r = await chat.send("my card got declined at the grocery store")
            assert time.monotonic() - started < 20
        assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.owner.bot_id == "cards"
        assert await owner_of(store, chat.conversation_id) == "cards"
        assert logged(mesh.bots["cards"], "conversation_taken_over")
    finally:
        await stop_slowpoke(mesh, "slowpoke-owner")


async def test_owner_killed_within_its_lease_the_entry_bot_takes_over_at_once(mesh, store, etcd):
    """The owner of a conversation is SIGKILLed while its lease (30 s) keeps it registered and in
    the router's view: a gateway that follows the docs (owner from the store; UNAVAILABLE → the
    entry bot, once) gets the next message answered within its 6 s deadline, because the entry bot
    finds the owner's instance does not answer a health check and takes the conversation over."""
    owner = await mesh.start_bot(
        SLOWPOKE, "slowpoke-killed", *HANDLERS, "--lease-ttl", "30", env={"FAULT_MODE": "slow_write", "FAULT_SECONDS": "0"}
    )
    await eventually(lambda: _router_ranks(mesh, "slowpoke"), timeout=30, interval=0.3)
    try:
        async with Conversation(mesh.bots["cards"].address, store_address=mesh.store.address, timeout_seconds=20) as chat:
            first = await chat.send(SLOW_TEXT)
            assert first.owner.bot_id == "slowpoke" and first.owner.address == owner.address
            dead = first.owner.instance_id
            owner.kill()
            assert await _router_ranks(mesh, "slowpoke")  # still registered: the lease window is real
        # Another gateway replica: the owner from the store (the dead instance's address).
        entry, cid = mesh.bots["cards"].address, chat.conversation_id
        async with Conversation(entry, cid, store_address=mesh.store.address, timeout_seconds=6) as gateway:
            started = time.monotonic()
            r = await gateway.send("my card got declined at the grocery store")
            elapsed = time.monotonic() - started
        assert elapsed < 6
        assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.owner.bot_id == "cards"
        record, _ = await store.get_owner(chat.conversation_id)
        assert record is not None and record.owner.bot_id == "cards" and record.owner.instance_id != dead
        assert record.owner.address == mesh.bots["cards"].address
        (taken,) = [e for e in logged(mesh.bots["cards"], "conversation_taken_over") if e["from_instance"] == dead]
        assert taken["reason"] in ("owner_unreachable", "owner_health_check_timed_out")
    finally:
        # Its lease would keep it in the router's view for 30 s: remove its registration.
        await etcd.delete_prefix(f"{PARTICIPANTS_PREFIX}{GROUP}/slowpoke/")
        await stop_slowpoke(mesh, "slowpoke-killed")


async def test_restarted_owner_rewrites_the_owner_record_with_its_instance(mesh, store):
    """slowpoke owns a conversation, is killed and started again (new instance id and address); the
    message sent to the new instance is answered, and the store's owner names the new instance,
    so a gateway asking GetOwner reaches a live address."""
    env = {"FAULT_MODE": "slow_write", "FAULT_SECONDS": "0"}
    first_life = await mesh.start_bot(SLOWPOKE, "slowpoke-restarted", *HANDLERS, env=env)
    await eventually(lambda: _router_ranks(mesh, "slowpoke"), timeout=30, interval=0.3)
    try:
        conversation = uuid.uuid4().hex
        first = await respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=20)
        assert first.owner.bot_id == "slowpoke" and first.owner.address == first_life.address
        first_life.kill()
        second_life = await mesh.start_bot(SLOWPOKE, "slowpoke-restarted", *HANDLERS, env=env)
        assert second_life.address != first_life.address
        await eventually(lambda: _router_ranks(mesh, "slowpoke"), timeout=30, interval=0.3)
        r = await respond(second_life.address, SLOW_TEXT, conversation, timeout=20)
        assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.owner.bot_id == "slowpoke"
        assert r.owner.instance_id != first.owner.instance_id and r.owner.address == second_life.address
        record, _ = await store.get_owner(conversation)
        assert record is not None
        assert (record.owner.bot_id, record.owner.instance_id, record.owner.address) == (
            "slowpoke",
            r.owner.instance_id,
            second_life.address,
        )
        assert logged(second_life, "conversation_reclaimed")
    finally:
        await stop_slowpoke(mesh, "slowpoke-restarted")


async def test_busy_but_alive_owner_keeps_its_conversation(mesh, store):
    """The owner is in the middle of a slow dialog for the conversation (its health answers
    SERVING): a message for the conversation that reaches the entry bot is refused with
    FAILED_PRECONDITION naming the owner, not taken over."""
    busy = await start_slowpoke(mesh, "slowpoke-busy", "slow_write")
    try:
        conversation = uuid.uuid4().hex
        first = await respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=20)
        assert first.owner.bot_id == "slowpoke"
        in_flight = asyncio.ensure_future(respond(busy.address, "I need to access my safe deposit box", conversation, timeout=20))
        await eventually(lambda: _logged_times(busy, "slow_dialog_started", 2), timeout=15, interval=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await respond(mesh.bots["cards"].address, "my card got declined at the grocery store", conversation)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "belongs to bot 'slowpoke'" in refused.value.details()
        answered = await asyncio.wait_for(in_flight, 20)
        assert answered.outcome == bot_pb2.OUTCOME_ANSWERED and answered.owner.bot_id == "slowpoke"
        assert await owner_of(store, conversation) == "slowpoke"
    finally:
        await stop_slowpoke(mesh, "slowpoke-busy")


async def test_store_refuses_writes_fenced_on_a_stale_owner_version(mesh, store):
    conversation = uuid.uuid4().hex
    mine = await store.claim_owner(conversation, common_pb2.BotRef(bot_id="cards"), 0)
    await store.set(GROUP, Scope.CONVERSATION, conversation, "topic", "card", owner_version=mine)
    await store.claim_owner(conversation, common_pb2.BotRef(bot_id="business-banking"), mine)
    for stale_write in (
        store.set(GROUP, Scope.CONVERSATION, conversation, "topic", "stale", owner_version=mine),
        store.delete(GROUP, Scope.CONVERSATION, conversation, "topic", owner_version=mine),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stale_write
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'business-banking'" in refused.value.details() and "fenced" in refused.value.details()
    assert (await store.get(GROUP, Scope.CONVERSATION, conversation, "topic"))[0] == "card"
    with pytest.raises(grpc.aio.AioRpcError) as wrong_scope:
        await store.set(GROUP, Scope.CONSUMER, "someone", "topic", "x", owner_version=mine)
    assert wrong_scope.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_frozen_bot_is_fenced_out_then_registers_again(mesh, store, etcd):
    """slowpoke owns a conversation and is in the middle of its dialog when it is frozen
    (SIGSTOP) past its lease TTL: it drops out of the router's view, personal banking takes the
    orphaned conversation over, and when slowpoke resumes, its write with its stale ownership is
    refused (the consumer call it was serving gets FAILED_PRECONDITION naming the new owner), not
    applied; it notices its lost lease and registers again under a new one."""
    frozen = await start_slowpoke(mesh, "slowpoke-frozen", "slow_write")
    try:
        conversation = uuid.uuid4().hex
        first = await respond(mesh.bots["cards"].address, SLOW_TEXT, conversation, timeout=20)
        assert first.outcome == bot_pb2.OUTCOME_TRANSFERRED and first.owner.bot_id == "slowpoke"
        assert await reservation(store, conversation) == SLOW_TEXT
        (old,), _ = await etcd.get_prefix(f"{PARTICIPANTS_PREFIX}{GROUP}/slowpoke/")

        again = "I need to access my safe deposit box"
        in_flight = asyncio.ensure_future(respond(frozen.address, again, conversation, timeout=40))
        await eventually(lambda: _logged_times(frozen, "slow_dialog_started", 2), timeout=15, interval=0.05)
        frozen.signal(signal.SIGSTOP)
        try:
            await eventually(lambda: _router_ranks_not(mesh, "slowpoke"), timeout=15, interval=0.3)
            taken = await respond(mesh.bots["personal-banking"].address, "what's my checking balance", conversation)
            assert taken.outcome == bot_pb2.OUTCOME_ANSWERED and taken.owner.bot_id == "personal-banking"
        finally:
            frozen.signal(signal.SIGCONT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(in_flight, 40)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "personal-banking" in refused.value.details()
        # Not applied: the store keeps the newer owner and the value written before the freeze.
        assert await owner_of(store, conversation) == "personal-banking"
        assert await reservation(store, conversation) == SLOW_TEXT
        assert logged(frozen, "write_fenced")
        # It noticed the lost lease and registered again, under a new lease, seen by the router.
        await eventually(lambda: _router_ranks(mesh, "slowpoke"), timeout=20, interval=0.3)
        (new,), _ = await etcd.get_prefix(f"{PARTICIPANTS_PREFIX}{GROUP}/slowpoke/")
        assert new.key == old.key and new.lease != old.lease
        assert logged(frozen, "registration_renewed")
    finally:
        await stop_slowpoke(mesh, "slowpoke-frozen")


async def _logged_times(component, event: str, times: int) -> bool:
    return len(logged(component, event)) >= times


def _desk(bot_id: str, phrase: str) -> participant_pb2.Participant:
    return participant_pb2.Participant(
        bot_id=bot_id,
        instance_id="i1",
        address="127.0.0.1:9",
        group="faults-travel",
        collaboration=True,
        intents=[participant_pb2.Intent(name="desk", phrases=[phrase, f"{phrase} please", f"I want {phrase}"])],
    )


async def test_router_relists_after_compaction_while_its_watch_was_down(mesh, etcd):
    """The router is frozen while one bot leaves, another joins, and enough happens in etcd for
    its watch to fall behind; etcd is compacted past what the router saw. Resumed, the router is
    told its watch was compacted, lists again and converges."""
    leaving = Registration(etcd, _desk("leaving-desk", "a travel notice for my trip"), ttl=30)
    joining = Registration(etcd, _desk("joining-desk", "order foreign currency"), ttl=30)
    await leaving.start()
    try:
        await eventually(lambda: _ranks(mesh, "a travel notice for my trip", "leaving-desk"), timeout=30, interval=0.3)
        compacted_before = len(logged(mesh.router, "watch_compacted"))
        mesh.router.signal(signal.SIGSTOP)
        try:
            await leaving.stop()
            await joining.start()
            # More than the router's watch stream can buffer, so etcd stops sending and falls behind.
            noise = f"{PARTICIPANTS_PREFIX}faults-noise/noise/i1"
            revision = 0
            for _ in range(40):
                revisions = await asyncio.gather(*(etcd.put(noise, b"\xff" * 4096) for _ in range(50)))
                revision = max(revision, *revisions)
            await etcd.delete(noise)
            await etcd.compact(revision)
        finally:
            mesh.router.signal(signal.SIGCONT)
        await eventually(lambda: _count_above(mesh.router, "watch_compacted", compacted_before), timeout=30)
        await eventually(lambda: _ranks(mesh, "order foreign currency", "joining-desk"), timeout=30, interval=0.3)
        r = await match(mesh.router.address, "a travel notice for my trip", group="faults-travel")
        assert {c.bot_id for c in r.candidates} == {"joining-desk"}
    finally:
        await leaving.stop()
        await joining.stop()


async def _ranks(mesh, text: str, bot_id: str) -> bool:
    try:
        return await ranked_first(mesh.router.address, text, "faults-travel") == bot_id
    except grpc.aio.AioRpcError:
        return False


async def _count_above(component, event: str, count: int) -> bool:
    return len(logged(component, event)) > count


async def test_group_unavailable_message_is_set_by_the_cli_and_read_by_bots(own_etcd, etcd):
    """`mbc group G --unavailable-message TEXT` writes the group's message; bots read it through
    their group settings cache; an empty text goes back to the default."""
    group = "faults-unavailable"
    for text, expected in (("{bot} is out to lunch.", "Cards Assistant is out to lunch."), ("", None)):
        command = [sys.executable, "-m", "mbc", "group", group, "--etcd", own_etcd.endpoint, "--unavailable-message", text]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "unavailable_message=" in done.stdout
        settings = await GroupSettingsCache(etcd, group).get()
        assert settings.unavailable_message == text
        assert unavailable_message(settings, "Cards Assistant") == (
            expected or DEFAULT_UNAVAILABLE_MESSAGE.replace("{bot}", "Cards Assistant")
        )


async def test_etcd_outage_mesh_keeps_serving_then_converges(mesh, own_etcd, etcd):
    """etcd stopped for 20 s: the router answers from its last index, bots answer their own
    intents and fall back for the rest, every call returns within its deadline; etcd back, the
    registrations are there and the router hands conversations over again. Last: it stops the
    module's etcd."""
    cards = mesh.bots["cards"].address
    await asyncio.to_thread(own_etcd.stop)
    try:
        stopped = time.monotonic()
        rounds = 0
        while time.monotonic() - stopped < 20:
            started = time.monotonic()
            r = await match(mesh.router.address, "I lost my debit card", group=GROUP)
            assert r.candidates[0].bot_id == "cards"
            own = await respond(cards, "my card got declined at the grocery store", timeout=5)
            assert own.outcome == bot_pb2.OUTCOME_ANSWERED and own.match.intent == "card_declined"
            # No transfer without the store (no claim could fence it): the bot's own fallback.
            other = await respond(cards, "How do I open a business checking account for my LLC?", timeout=5)
            assert other.outcome == bot_pb2.OUTCOME_FALLBACK and other.owner.bot_id == "cards"
            assert time.monotonic() - started < 10
            rounds += 1
            await asyncio.sleep(1)
        assert rounds >= 3
    finally:
        await asyncio.to_thread(own_etcd.start)

    async def all_registered():
        items, _ = await etcd.get_prefix(f"{PARTICIPANTS_PREFIX}{GROUP}/")
        return {participant_pb2.Participant.FromString(kv.value).bot_id for kv in items} == {
            "personal-banking",
            "business-banking",
            "cards",
        }

    await eventually(all_registered, timeout=30, interval=0.5)

    async def transfers_again():
        r = await respond(mesh.bots["personal-banking"].address, "I lost my debit card", timeout=10)
        return r.outcome == bot_pb2.OUTCOME_TRANSFERRED and r.owner.bot_id == "cards"

    await eventually(transfers_again, timeout=30, interval=0.5)
