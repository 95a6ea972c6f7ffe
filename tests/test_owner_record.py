"""The owner record keeps the bot (its group) and a transfer's answer, for gateways and for the
transfer's retries on other instances (issue 15, item 6): the store over gRPC, a real etcd."""

from __future__ import annotations

import uuid

import grpc
import pytest

from context_store.core import StoreConfig
from context_store.server import StoreProcess
from mbc.client.context import ContextClient
from mbc.runtime.channels import open_channel
from mbc.runtime.config import ServerConfig, TlsConfig
from mbc.v1 import bot_pb2, common_pb2
from pki import TestCA

pytestmark = pytest.mark.integration

MAX_VALUE_BYTES = 2000


@pytest.fixture(scope="module")
async def store_process(etcd_server):
    process = StoreProcess((etcd_server.endpoint,), ServerConfig(port=0), StoreConfig(max_value_bytes=MAX_VALUE_BYTES))
    await process.start()
    yield process
    await process.stop()


@pytest.fixture
async def store(store_process):
    channel = grpc.aio.insecure_channel(store_process.server.address)
    yield ContextClient(channel)
    await channel.close()


CARDS = common_pb2.BotRef(bot_id="cards", instance_id="i1", address="127.0.0.1:7001", group="retail-bank")


async def test_the_record_keeps_the_group_and_the_answer_to_its_transfer(store):
    conversation = uuid.uuid4().hex
    claimed = await store.claim_owner(conversation, CARDS, 0, transfer_id="t1")
    answer = bot_pb2.TransferResponse(
        replies=[common_pb2.Reply(bot_id="cards", text="I've locked your card.")], owner=CARDS, outcome=bot_pb2.OUTCOME_ANSWERED
    )
    recorded = await store.claim_owner(conversation, CARDS, claimed, transfer_id="t1", transfer_response=answer)
    ownership, version = await store.get_owner(conversation)
    assert version == recorded > claimed
    assert ownership.owner == CARDS and ownership.owner.group == "retail-bank"
    assert ownership.transfer_id == "t1" and ownership.transfer_response == answer
    # The next claim (a sibling instance answering, another transfer) replaces the answer.
    await store.claim_owner(conversation, CARDS, recorded)
    ownership, _ = await store.get_owner(conversation)
    assert not ownership.HasField("transfer_response")


async def test_an_answer_without_its_transfer_or_too_large_is_refused(store):
    conversation = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.claim_owner(conversation, CARDS, 0, transfer_response=bot_pb2.TransferResponse(owner=CARDS))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs the transfer_id" in err.value.details()
    huge = bot_pb2.TransferResponse(replies=[common_pb2.Reply(bot_id="cards", text="x" * MAX_VALUE_BYTES)])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.claim_owner(conversation, CARDS, 0, transfer_id="t1", transfer_response=huge)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"the maximum is {MAX_VALUE_BYTES}" in err.value.details()
    long_group = common_pb2.BotRef(bot_id="cards", group="g" * 300)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await store.claim_owner(conversation, long_group, 0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ownership.owner.group has 300 characters" in err.value.details()
    assert await store.get_owner(conversation) == (None, 0)


def _tls(ca: TestCA, identity: str) -> TlsConfig:
    files = ca.issue(identity)
    return TlsConfig(ca_file=str(files.ca), cert_file=str(files.cert), key_file=str(files.key))


async def test_with_mtls_only_the_owners_group_reads_the_answer(etcd_server, tmp_path):
    ca = TestCA(tmp_path / "pki")
    process = StoreProcess((etcd_server.endpoint,), ServerConfig(port=0, tls=_tls(ca, "store")))
    await process.start()
    try:
        conversation = uuid.uuid4().hex
        answer = bot_pb2.TransferResponse(replies=[common_pb2.Reply(bot_id="cards", text="Hi Sam")], owner=CARDS)
        owners = {}
        for identity in ("bot/retail-bank/cards", "bot/other-group/cards", "gateway/web"):
            async with open_channel(process.server.address, _tls(ca, identity)) as channel:
                client = ContextClient(channel)
                if identity == "bot/retail-bank/cards":
                    await client.claim_owner(conversation, CARDS, 0, transfer_id="t1", transfer_response=answer)
                owners[identity], _ = await client.get_owner(conversation)
        assert owners["bot/retail-bank/cards"].transfer_response == answer
        for stranger in ("bot/other-group/cards", "gateway/web"):
            assert owners[stranger].owner == CARDS and owners[stranger].transfer_id == "t1"
            assert not owners[stranger].HasField("transfer_response")
    finally:
        await process.stop()
