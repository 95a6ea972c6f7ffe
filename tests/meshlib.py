"""A mesh of real processes for the tests: the store, the router and bots, over a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bot_server.definition import BotDefinition
from mbc.channels import open_channel
from mbc.config import TlsConfig
from mbc.context_client import ContextClient
from mbc.gateway import Conversation
from mbc.processes import ComponentProcess
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEST_BOTS = Path(__file__).resolve().parent / "bots"
LEASE_TTL = 3
# A component loads torch and the model before it serves: minutes when several meshes share 2 cores.
START_TIMEOUT = 240.0

class Mesh:
    """`etcd_endpoint` may list several endpoints, comma-separated (a cluster). `etcd_flags(name)`
    gives the etcd TLS and user flags of the component called `name` ("store", "router", a bot's name).
    With `ca` (tests/pki.py TestCA), every component serves and calls over mTLS with a certificate
    of its identity (store, router, bot/<group>/<bot_id>); `client_tls` is a gateway's."""

    def __init__(self, etcd_endpoint: str, workdir: Path,
                 etcd_flags: Callable[[str], list[str]] | None = None, ca=None) -> None:
        self.etcd = etcd_endpoint
        self.workdir = workdir
        self._etcd_flags = etcd_flags or (lambda name: [])
        self.ca = ca
        self.client_tls = self.tls("gateway/tests")
        self.router: ComponentProcess | None = None
        self.store: ComponentProcess | None = None
        self.bots: dict[str, ComponentProcess] = {}

    def tls(self, identity: str) -> TlsConfig:
        """A certificate of the mesh's CA naming `identity`; no TLS for a plaintext mesh."""
        if self.ca is None:
            return TlsConfig()
        files = self.ca.issue(identity)
        return TlsConfig(ca_file=str(files.ca), cert_file=str(files.cert), key_file=str(files.key))

    def _tls_flags(self, identity: str) -> list[str]:
        tls = self.tls(identity)
        return ["--tls-ca", tls.ca_file, "--tls-cert", tls.cert_file, "--tls-key", tls.key_file] if tls.enabled else []

    async def start_store(self) -> ComponentProcess:
        self.store = ComponentProcess("store", ["store", "--etcd", self.etcd, *self._etcd_flags("store"), *self._tls_flags("store")],
                                      self.workdir)
        await self.store.wait_serving(timeout=START_TIMEOUT, tls=self.client_tls)
        return self.store

    async def start_router(self, env: dict[str, str] | None = None) -> ComponentProcess:
        self.router = ComponentProcess("router", ["router", "--etcd", self.etcd, *self._etcd_flags("router"), *self._tls_flags("router")],
                                       self.workdir, env=env)
        await self.router.wait_serving(timeout=START_TIMEOUT, tls=self.client_tls)
        return self.router

    async def start_bot(self, path: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> ComponentProcess:
        bot = ComponentProcess(
            name,
            ["bot", str(path), "--etcd", self.etcd, *self._etcd_flags(name), "--router", self.router.address,
             "--store", self.store.address, "--lease-ttl", str(LEASE_TTL), *self._bot_tls_flags(path), *extra],
            self.workdir,
            env=env,
        )
        self.bots[name] = bot
        await bot.wait_serving(timeout=START_TIMEOUT, tls=self.client_tls)
        return bot

    def _bot_tls_flags(self, path: Path) -> list[str]:
        if self.ca is None:
            return []
        definition = BotDefinition.from_file(path)
        return self._tls_flags(f"bot/{definition.group}/{definition.bot_id}")

    def stop(self) -> None:
        """The bots (they leave etcd and may still call the store), then the router and the store;
        the components of each step are stopped together, so their exits overlap."""
        for step in (list(self.bots.values()), [c for c in (self.router, self.store) if c]):
            if step:
                with ThreadPoolExecutor(len(step)) as pool:
                    list(pool.map(ComponentProcess.terminate, step))


async def match(address: str, text: str, tls: TlsConfig = TlsConfig(), **fields) -> router_pb2.MatchResponse:
    async with open_channel(address, tls) as channel:
        return await router_pb2_grpc.RouterStub(channel).Match(router_pb2.MatchRequest(text=text, **fields), timeout=10)


async def respond(address: str, text: str, conversation_id: str | None = None, timeout: float = 10.0,
                  tls: TlsConfig = TlsConfig()) -> bot_pb2.RespondResponse:
    async with Conversation(address, conversation_id, timeout_seconds=timeout, tls=tls) as chat:
        return await chat.send(text)


async def eventually(check, timeout: float, interval: float = 0.2):
    """Poll `check` (async, returns truthy when done) until it passes; returns (value, seconds)."""
    start = time.monotonic()
    while True:
        value = await check()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def transfer(address: str, tls: TlsConfig = TlsConfig(), **fields) -> bot_pb2.TransferResponse:
    request = bot_pb2.TransferRequest(
        transfer_id=fields.pop("transfer_id", uuid.uuid4().hex),
        conversation_id=fields.pop("conversation_id", uuid.uuid4().hex),
        sender=fields.pop("sender", common_pb2.BotRef(bot_id="personal-banking")),
        **fields,
    )
    async with open_channel(address, tls) as channel:
        return await bot_pb2_grpc.BotStub(channel).Transfer(request, timeout=10)




EXAMPLE_PROBES = {"cards": "I lost my debit card", "business-banking": "open a business account for my LLC",
                  "personal-banking": "what's my checking balance"}
"""An utterance each example bot is the best match for."""


async def wait_indexed(mesh: Mesh, bot_ids, timeout: float = 30.0) -> None:
    """Until the router ranks each of `bot_ids` (example bots) first for its EXAMPLE_PROBES utterance."""

    async def indexed():
        for bot_id in bot_ids:
            r = await match(mesh.router.address, EXAMPLE_PROBES[bot_id], group="retail-bank", tls=mesh.client_tls)
            if not r.candidates or r.candidates[0].bot_id != bot_id:
                return False
        return True

    await eventually(indexed, timeout=timeout)


@contextlib.asynccontextmanager
async def start_example_mesh(etcd_endpoint: str, workdir: Path, etcd_flags: Callable[[str], list[str]] | None = None, ca=None,
                             router_env: dict[str, str] | None = None):
    """The store, the router (with `router_env` added to its environment) and the three example
    bots, the router having indexed them (over mTLS with `ca`)."""
    mesh = Mesh(etcd_endpoint, workdir, etcd_flags, ca)
    try:
        await asyncio.gather(mesh.start_store(), mesh.start_router(router_env))
        await asyncio.gather(
            mesh.start_bot(EXAMPLES / "personal_banking.yaml", "personal-banking"),
            mesh.start_bot(EXAMPLES / "business_banking.yaml", "business-banking"),
            mesh.start_bot(EXAMPLES / "cards.yaml", "cards"),
        )
        await wait_indexed(mesh, EXAMPLE_PROBES)
        yield mesh
    finally:
        mesh.stop()


async def owner_of(store: ContextClient, conversation_id: str) -> str:
    """The bot id the store records as the conversation's owner ("" when none)."""
    ownership, _ = await store.get_owner(conversation_id)
    return ownership.owner.bot_id if ownership else ""
