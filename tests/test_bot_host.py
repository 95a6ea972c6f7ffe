"""Bots without the model, and many bots in one process (`mbc bot A.yaml B.yaml ...` on one port).

A bot process loads no model: with no router answering, it answers a message that matches one of
its own phrases by words and gives its fallback otherwise. A host of several definitions serves
them all on one port, each its own participant, and a call names its bot."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import grpc
import pytest

from mbc.client.gateway import Conversation
from mbc.runtime.channels import open_channel
from mbc.testing.mesh import EXAMPLE_BOTS, EXAMPLE_GROUP, EXAMPLE_PROBES, EXAMPLES, LocalMesh, wait_indexed, wait_trained
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

HEAVY = ("torch", "sentence_transformers", "faiss", "sklearn", "transformers", "onnxruntime")
"""Libraries a bot process must not import by default (the model's)."""
MAX_BOT_RSS_MB = 120


def _closed_port() -> int:
    """A port nothing listens on (the router of a bot that must find no router)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _respond(address: str, text: str, bot_id: str = "", conversation_id: str = "") -> bot_pb2.RespondResponse:
    request = bot_pb2.RespondRequest(conversation_id=conversation_id or uuid.uuid4().hex, text=text, bot_id=bot_id)
    async with open_channel(address) as channel:
        return await bot_pb2_grpc.BotStub(channel).Respond(request, timeout=30)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- a bot alone: no router answers -----------------------------------------------------------


@pytest.fixture(scope="module")
async def lone(etcd_server, tmp_path_factory):
    """The cards bot as `mbc bot` starts it, with a router address where nothing listens, its
    imports logged (PYTHONPROFILEIMPORTTIME) into its log."""
    mesh = LocalMesh(tmp_path_factory.mktemp("lone"), etcd_server.endpoint, lease_ttl=3)
    try:
        flags = ("--router", f"127.0.0.1:{_closed_port()}")
        bot = await mesh.start_bot(EXAMPLES / "cards.yaml", "cards-alone", *flags, env={"PYTHONPROFILEIMPORTTIME": "1"})
        yield bot
    finally:
        mesh.stop()


async def test_with_no_router_a_bot_answers_its_own_phrases_by_words_and_falls_back_otherwise(lone):
    exact = await _respond(lone.address, "  MY CARD was declined!! ")
    assert exact.outcome == bot_pb2.OUTCOME_ANSWERED and exact.match.intent == "card_declined"
    assert exact.match.score == pytest.approx(1.0) and exact.replies[0].bot_id == "cards"
    near = await _respond(lone.address, "my card was declined at the store")
    assert near.outcome == bot_pb2.OUTCOME_ANSWERED and near.match.intent == "card_declined"
    # A paraphrase sharing a few words is the router's to judge: without it, the fallback.
    for text in ("my card got declined at the grocery store", "which pizza place delivers fastest"):
        r = await _respond(lone.address, text)
        assert r.outcome == bot_pb2.OUTCOME_FALLBACK, text
        assert r.replies[0].text.startswith("Sorry, I'm not sure I understood.") and r.owner.bot_id == "cards"


async def test_a_bot_process_imports_no_model_and_stays_small(lone):
    await _respond(lone.address, "I lost my debit card")  # the no-router path has run
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in lone.log_path.read_text(errors="replace").splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "bot_server" in imported and "grpc" in imported  # the import log is there
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert _rss_mb(lone.pid) <= MAX_BOT_RSS_MB


# -- a host of three bots on one port, with a real router and store ----------------------------


@pytest.fixture(scope="module")
async def host(own_etcd, tmp_path_factory):
    """etcd, the store, a router and the three example bots in one `mbc bot` process."""
    mesh = LocalMesh(tmp_path_factory.mktemp("host"), own_etcd.endpoint, lease_ttl=3)
    try:
        await mesh.start_store()
        await mesh.start_router()
        await mesh.start_host(EXAMPLE_BOTS, "bank-host")
        await wait_indexed(mesh.router.address, EXAMPLE_PROBES, group=EXAMPLE_GROUP, timeout=300)
        await wait_trained(mesh.router, 300)
        yield mesh
    finally:
        mesh.stop()


async def test_each_hosted_bot_answers_when_named(host):
    address = host.bots["bank-host"].address
    for bot_id, probe in EXAMPLE_PROBES.items():
        r = await _respond(address, probe, bot_id=bot_id)
        assert r.outcome == bot_pb2.OUTCOME_ANSWERED, (bot_id, r)
        assert r.match.bot_id == bot_id and {reply.bot_id for reply in r.replies} == {bot_id}
        assert r.owner.bot_id == bot_id and r.owner.address == address


async def test_a_gateway_names_the_entry_bot_of_a_host_and_follows_the_owner_bot(host):
    """The gateway helper's entry bot on a host, then the owner bot it was handed to, by name."""
    store = host.store.address
    async with Conversation(host.bots["bank-host"].address, store_address=store, entry_bot_id="personal-banking") as chat:
        first = await chat.send(EXAMPLE_PROBES["cards"])
        assert first.outcome == bot_pb2.OUTCOME_TRANSFERRED and first.owner.bot_id == "cards", first
        second = await chat.send(EXAMPLE_PROBES["personal-banking"])
        assert second.outcome == bot_pb2.OUTCOME_TRANSFERRED and second.owner.bot_id == "personal-banking", second


async def test_a_call_to_a_host_must_name_a_bot_it_hosts(host):
    address = host.bots["bank-host"].address
    with pytest.raises(grpc.aio.AioRpcError) as unnamed:
        await _respond(address, "I lost my debit card")
    assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bot_id is required" in unnamed.value.details()
    assert all(bot_id in unnamed.value.details() for bot_id in EXAMPLE_PROBES)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _respond(address, "I lost my debit card", bot_id="travel")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND and "'travel' is not hosted" in unknown.value.details()
    transfer = bot_pb2.TransferRequest(
        transfer_id=uuid.uuid4().hex,
        conversation_id=uuid.uuid4().hex,
        text="I lost my debit card",
        sender=common_pb2.BotRef(bot_id="personal-banking"),
        receiver_bot_id="travel",
    )
    async with open_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await bot_pb2_grpc.BotStub(channel).Transfer(transfer, timeout=30)
    assert nobody.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_conversation_is_handed_over_between_two_bots_of_one_host(host):
    address = host.bots["bank-host"].address
    conversation = uuid.uuid4().hex
    first = await _respond(address, EXAMPLE_PROBES["personal-banking"], "personal-banking", conversation)
    assert first.owner.bot_id == "personal-banking"
    handed = await _respond(address, EXAMPLE_PROBES["cards"], "personal-banking", conversation)
    assert handed.outcome == bot_pb2.OUTCOME_TRANSFERRED and handed.transfer_id
    assert handed.owner.bot_id == "cards" and handed.owner.address == address
    assert handed.replies[-1].bot_id == "cards"
    # The next message goes to the new owner, named in the call.
    again = await _respond(address, "my credit card was stolen", handed.owner.bot_id, conversation)
    assert again.outcome == bot_pb2.OUTCOME_ANSWERED and again.owner.bot_id == "cards"


async def test_each_hosted_bot_is_its_own_registered_participant_routed_to_the_host(host):
    address = host.bots["bank-host"].address
    instances = {}
    async with open_channel(host.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        for bot_id, probe in EXAMPLE_PROBES.items():
            r = await router.Match(router_pb2.MatchRequest(text=probe, group=EXAMPLE_GROUP), timeout=30)
            best = r.candidates[0]
            assert (best.bot_id, best.address) == (bot_id, address)
            instances[bot_id] = best.instance_id
    assert len(set(instances.values())) == 3 and all(instances.values())


async def test_with_the_local_model_a_bot_answers_a_paraphrase_without_the_router(etcd_server, tmp_path):
    """`--local-model`: the old behaviour, for those who want it (the model in the bot process)."""
    mesh = LocalMesh(tmp_path, etcd_server.endpoint, lease_ttl=3)
    try:
        bot = await mesh.start_bot(
            EXAMPLES / "cards.yaml", "cards-model", "--router", f"127.0.0.1:{_closed_port()}", "--local-model"
        )
        r = await _respond(bot.address, "my card got declined at the grocery store")
        assert r.outcome == bot_pb2.OUTCOME_ANSWERED and r.match.intent == "card_declined"
    finally:
        mesh.stop()
