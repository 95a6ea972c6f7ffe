"""Test helpers over the mesh harness (mbc/testing/mesh.py): one-call Match, Respond and Transfer,
the example mesh with the tests' short lease, the store's owner of a conversation."""

from __future__ import annotations

import contextlib
import types
import uuid
from collections.abc import Callable
from pathlib import Path

from mbc.client.context import ContextClient
from mbc.client.gateway import Conversation
from mbc.runtime.channels import open_channel
from mbc.runtime.config import RouterConfig, ServerConfig, TlsConfig
from mbc.testing.mesh import EXAMPLE_BOTS, start_local
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from router.server import RouterProcess

ROOT = Path(__file__).resolve().parent.parent
TEST_BOTS = Path(__file__).resolve().parent / "bots"
LEASE_TTL = 3
"""The bots' lease TTL in the tests' meshes: a dead instance leaves within seconds."""


async def match(address: str, text: str, tls: TlsConfig = TlsConfig(), **fields) -> router_pb2.MatchResponse:
    async with open_channel(address, tls) as channel:
        return await router_pb2_grpc.RouterStub(channel).Match(router_pb2.MatchRequest(text=text, **fields), timeout=10)


async def respond(
    address: str, text: str, conversation_id: str | None = None, timeout: float = 10.0, tls: TlsConfig = TlsConfig()
) -> bot_pb2.RespondResponse:
    async with Conversation(address, conversation_id, timeout_seconds=timeout, tls=tls) as chat:
        return await chat.send(text)


async def transfer(address: str, tls: TlsConfig = TlsConfig(), **fields) -> bot_pb2.TransferResponse:
    request = bot_pb2.TransferRequest(
        transfer_id=fields.pop("transfer_id", uuid.uuid4().hex),
        conversation_id=fields.pop("conversation_id", uuid.uuid4().hex),
        sender=fields.pop("sender", common_pb2.BotRef(bot_id="personal-banking")),
        **fields,
    )
    async with open_channel(address, tls) as channel:
        return await bot_pb2_grpc.BotStub(channel).Transfer(request, timeout=10)


@contextlib.asynccontextmanager
async def start_example_mesh(
    etcd_endpoint: str,
    workdir: Path,
    etcd_flags: Callable[[str], list[str]] | None = None,
    ca=None,
    router_env: dict[str, str] | None = None,
):
    """The store, the router (with `router_env` added to its environment) and the three example
    bots on `etcd_endpoint`, the router having indexed them (over mTLS with `ca`)."""
    async with start_local(
        EXAMPLE_BOTS,
        workdir=workdir,
        etcd=etcd_endpoint,
        etcd_flags=etcd_flags,
        ca=ca,
        router_env=router_env,
        lease_ttl=LEASE_TTL,
    ) as mesh:
        yield mesh


async def owner_of(store: ContextClient, conversation_id: str) -> str:
    """The bot id the store records as the conversation's owner ("" when none)."""
    ownership, _ = await store.get_owner(conversation_id)
    return ownership.owner.bot_id if ownership else ""


async def start_router_in_process(etcd_endpoint: str, encoder, embedding_cache_dir: str) -> RouterProcess:
    """A router in the test process over `etcd_endpoint`, on a free port, sharing the session's
    `encoder` (its stop() leaves that encoder open)."""
    config = RouterConfig(etcd_endpoints=(etcd_endpoint,), server=ServerConfig(port=0), embedding_cache_dir=embedding_cache_dir)
    process = RouterProcess(config, encoder=encoder)
    process.encoder = types.SimpleNamespace(close=lambda: None)  # stop() closes it: the session's encoder is shared
    await process.start()
    return process
