"""Who may call what, on a real mesh over mTLS: the store, the router and two example bots
(personal-banking and cards, group retail-bank) as processes over a real etcd, every one with its
own certificate of a test CA.

Callers in these tests present certificates of the same CA for other identities: a bot of another
group, a gateway, a bot of the group pretending to be another, a certificate naming no mesh
identity. A refused call changes nothing: the owner stays, the transfer id is not used up.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
import pytest_asyncio
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mbc.cli.inspect import list_participants
from mbc.client.gateway import Conversation
from mbc.runtime.channels import open_channel
from mbc.runtime.config import TlsConfig
from mbc.testing.mesh import EXAMPLES, LocalMesh
from mbc.v1 import bot_pb2, common_pb2, context_pb2, context_pb2_grpc
from meshlib import LEASE_TTL, transfer
from pki import TestCA

pytestmark = pytest.mark.integration

pytestmark = pytest.mark.timeout(600)  # the first test starts the mesh: minutes on a loaded machine

GROUP = "retail-bank"


@pytest_asyncio.fixture(scope="module")
async def mesh(etcd_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mtls-mesh")
    mesh = LocalMesh(workdir, etcd_server.endpoint, ca=TestCA(workdir / "pki"), lease_ttl=LEASE_TTL)
    try:
        await asyncio.gather(mesh.start_store(), mesh.start_router())
        await asyncio.gather(
            mesh.start_bot(EXAMPLES / "personal_banking.yaml", "personal-banking"),
            mesh.start_bot(EXAMPLES / "cards.yaml", "cards"),
        )
        await mesh.wait_indexed(["personal-banking", "cards"], timeout=120)
        yield mesh
    finally:
        mesh.stop()


async def owned_by_personal_banking(mesh) -> tuple[str, int]:
    """A new conversation that personal-banking answered (it owns it): (id, owner version)."""
    async with Conversation(mesh.bots["personal-banking"].address, store_address=mesh.store.address, tls=mesh.client_tls) as chat:
        response = await chat.send("What's the balance on my checking account?")
        assert response.owner.bot_id == "personal-banking"
        owner = await get_owner(mesh, chat.conversation_id)
        return chat.conversation_id, owner.version


async def get_owner(mesh, conversation_id: str) -> context_pb2.GetOwnerResponse:
    async with open_channel(mesh.store.address, mesh.client_tls) as channel:
        return await context_pb2_grpc.ContextStoreStub(channel).GetOwner(
            context_pb2.GetOwnerRequest(conversation_id=conversation_id), timeout=10
        )


def lost_card(conversation_id: str, version: int, transfer_id: str) -> dict:
    return dict(
        conversation_id=conversation_id,
        transfer_id=transfer_id,
        owner_version=version,
        sender=common_pb2.BotRef(bot_id="personal-banking"),
        receiver_bot_id="cards",
        text="I lost my debit card",
        intent="lost_or_stolen_card",
    )


async def refused_transfer(mesh, caller: TlsConfig, **fields) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await transfer(mesh.bots["cards"].address, tls=caller, **fields)
    return error.value


async def test_a_conversation_with_a_transfer_over_mtls(mesh):
    async with Conversation(mesh.bots["personal-banking"].address, store_address=mesh.store.address, tls=mesh.client_tls) as chat:
        response = await chat.send("I lost my debit card")
        assert response.outcome == bot_pb2.OUTCOME_TRANSFERRED
        assert [r.bot_id for r in response.replies][-1] == "cards"
        assert response.owner.bot_id == "cards"
        assert (await get_owner(mesh, chat.conversation_id)).ownership.owner.bot_id == "cards"
        follow_up = await chat.send("How do I activate my new card?")
        assert follow_up.replies and follow_up.owner.bot_id == "cards"


async def test_every_component_refuses_plaintext(mesh):
    for component in (mesh.store, mesh.router, *mesh.bots.values()):
        async with grpc.aio.insecure_channel(component.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, component.name


async def test_mbc_participants_checks_health_over_mtls(mesh):
    rows, _ = await list_participants([mesh.etcd], GROUP, timeout=10, tls=mesh.client_tls)
    assert sorted((r.bot_id, r.health) for r in rows) == [("cards", "SERVING"), ("personal-banking", "SERVING")]
    plaintext, _ = await list_participants([mesh.etcd], GROUP, timeout=10)
    assert {r.health for r in plaintext} == {"UNREACHABLE"}


async def test_transfer_from_a_bot_of_another_group_is_denied_and_changes_nothing(mesh):
    conversation_id, version = await owned_by_personal_banking(mesh)
    transfer_id = uuid.uuid4().hex
    error = await refused_transfer(
        mesh, mesh.tls("bot/other-bank/personal-banking"), **lost_card(conversation_id, version, transfer_id)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only bots of group 'retail-bank'" in error.details()

    owner = await get_owner(mesh, conversation_id)
    assert (owner.ownership.owner.bot_id, owner.version) == ("personal-banking", version)
    # The transfer id was not recorded: the real sender's transfer with it goes through.
    taken = await transfer(
        mesh.bots["cards"].address,
        tls=mesh.tls(f"bot/{GROUP}/personal-banking"),
        **lost_card(conversation_id, version, transfer_id),
    )
    assert taken.owner.bot_id == "cards" and taken.replies[0].bot_id == "cards"


async def test_transfer_from_a_gateway_is_denied(mesh):
    conversation_id, version = await owned_by_personal_banking(mesh)
    error = await refused_transfer(mesh, mesh.client_tls, **lost_card(conversation_id, version, uuid.uuid4().hex))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await get_owner(mesh, conversation_id)).ownership.owner.bot_id == "personal-banking"


async def test_transfer_as_another_bot_of_the_group_is_denied(mesh):
    conversation_id, version = await owned_by_personal_banking(mesh)
    error = await refused_transfer(
        mesh, mesh.tls(f"bot/{GROUP}/business-banking"), **lost_card(conversation_id, version, uuid.uuid4().hex)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "as bot 'personal-banking'" in error.details()


async def test_transfer_with_a_certificate_naming_no_mesh_identity_is_unauthenticated(mesh):
    conversation_id, version = await owned_by_personal_banking(mesh)
    error = await refused_transfer(mesh, mesh.tls("jane-doe"), **lost_card(conversation_id, version, uuid.uuid4().hex))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await get_owner(mesh, conversation_id)).ownership.owner.bot_id == "personal-banking"


def name_key(conversation_id: str, namespace: str = GROUP) -> context_pb2.ContextKey:
    return context_pb2.ContextKey(namespace=namespace, scope=context_pb2.SCOPE_CONVERSATION, scope_id=conversation_id, key="name")


async def store_call(mesh, caller: TlsConfig, method: str, request):
    async with open_channel(mesh.store.address, caller) as channel:
        return await getattr(context_pb2_grpc.ContextStoreStub(channel), method)(request, timeout=10)


async def store_refusal(mesh, caller: TlsConfig, method: str, request) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await store_call(mesh, caller, method, request)
    return error.value.code()


async def test_context_of_a_group_is_read_and_written_only_by_its_bots(mesh):
    conversation_id = uuid.uuid4().hex
    cards = mesh.tls(f"bot/{GROUP}/cards")
    written = await store_call(
        mesh,
        cards,
        "Set",
        context_pb2.SetContextRequest(key=name_key(conversation_id), value=struct_pb2.Value(string_value="Sam")),
    )

    outsider, gateway = mesh.tls("bot/other-bank/cards"), mesh.client_tls
    for caller in (outsider, gateway):
        attempts = {
            "Set": context_pb2.SetContextRequest(key=name_key(conversation_id), value=struct_pb2.Value(string_value="Eve")),
            "Delete": context_pb2.DeleteContextRequest(key=name_key(conversation_id)),
            "RegisterNamespace": context_pb2.RegisterNamespaceRequest(namespace=GROUP, ttl_seconds=1),
            "Get": context_pb2.GetContextRequest(key=name_key(conversation_id)),
            "List": context_pb2.ListContextRequest(
                namespace=GROUP, scope=context_pb2.SCOPE_CONVERSATION, scope_id=conversation_id
            ),
        }
        for method, request in attempts.items():
            assert await store_refusal(mesh, caller, method, request) == grpc.StatusCode.PERMISSION_DENIED, (
                method,
                caller.cert_file,
            )
    assert (
        await store_refusal(
            mesh,
            mesh.tls("jane-doe"),
            "Set",
            context_pb2.SetContextRequest(key=name_key(conversation_id), value=struct_pb2.Value(string_value="Eve")),
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )

    read = await store_call(
        mesh, mesh.tls(f"bot/{GROUP}/personal-banking"), "Get", context_pb2.GetContextRequest(key=name_key(conversation_id))
    )
    assert (read.value.string_value, read.version) == ("Sam", written.version)


async def test_a_namespace_belongs_to_the_group_that_registered_it_first(mesh):
    namespace = f"ns-{uuid.uuid4().hex[:8]}"
    register = context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=3600)
    await store_call(mesh, mesh.tls("bot/other-bank/loans"), "RegisterNamespace", register)
    assert (
        await store_refusal(mesh, mesh.tls(f"bot/{GROUP}/cards"), "RegisterNamespace", register)
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        await store_refusal(
            mesh,
            mesh.tls(f"bot/{GROUP}/cards"),
            "Set",
            context_pb2.SetContextRequest(key=name_key("c1", namespace), value=struct_pb2.Value(string_value="x")),
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )
    await store_call(
        mesh,
        mesh.tls("bot/other-bank/savings"),
        "Set",
        context_pb2.SetContextRequest(key=name_key("c1", namespace), value=struct_pb2.Value(string_value="x")),
    )


async def test_only_bots_of_its_group_may_claim_a_conversation(mesh):
    conversation_id, version = await owned_by_personal_banking(mesh)

    def claim(bot_id: str) -> context_pb2.ClaimOwnerRequest:
        return context_pb2.ClaimOwnerRequest(
            conversation_id=conversation_id,
            expected_version=version,
            ownership=context_pb2.Ownership(owner=common_pb2.BotRef(bot_id=bot_id)),
        )

    assert (
        await store_refusal(mesh, mesh.tls("bot/other-bank/thief"), "ClaimOwner", claim("thief"))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert await store_refusal(mesh, mesh.client_tls, "ClaimOwner", claim("cards")) == grpc.StatusCode.PERMISSION_DENIED
    assert (
        await store_refusal(mesh, mesh.tls("jane-doe"), "GetOwner", context_pb2.GetOwnerRequest(conversation_id=conversation_id))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    owner = await get_owner(mesh, conversation_id)
    assert (owner.ownership.owner.bot_id, owner.version) == ("personal-banking", version)

    # A new conversation belongs to the group of the bot that claims it first.
    fresh = uuid.uuid4().hex
    first = context_pb2.ClaimOwnerRequest(
        conversation_id=fresh, expected_version=0, ownership=context_pb2.Ownership(owner=common_pb2.BotRef(bot_id="loans"))
    )
    claimed = await store_call(mesh, mesh.tls("bot/other-bank/loans"), "ClaimOwner", first)
    steal = context_pb2.ClaimOwnerRequest(
        conversation_id=fresh,
        expected_version=claimed.version,
        ownership=context_pb2.Ownership(owner=common_pb2.BotRef(bot_id="cards")),
    )
    assert await store_refusal(mesh, mesh.tls(f"bot/{GROUP}/cards"), "ClaimOwner", steal) == grpc.StatusCode.PERMISSION_DENIED
