"""The bot process: host one or more bots on one gRPC port, register each in etcd, leave cleanly on SIGTERM.

Every hosted bot is its own participant (bot id, group, instance id, registration, conversation
state, engine); what a process needs only once is shared: the event loop, the gRPC server, the
etcd client, the channel pool (router, store, other bots) and the store client. A hosted bot
matches its own intents by words when no router answers (bot_server/lexical.py): the process
loads no model unless given `own_intents` (`mbc bot --local-model`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence

from bot_server.bot import Bot, load_bots
from bot_server.engine import BotEngine, OwnIntents
from bot_server.lexical import LexicalIntents
from bot_server.servicer import BotServicer
from bot_server.state import MemoryState, StoreState
from discovery import EtcdClient, LeaseKeeper, Registration
from discovery.groups import GroupSettingsCache
from discovery.presence import is_registered
from discovery.routers import RouterWatcher
from mbc import __version__
from mbc.client.context import ContextClient
from mbc.runtime.channels import ChannelPool
from mbc.runtime.config import LOCAL_ROUTER, NO_ROUTER, BotConfig
from mbc.runtime.logs import bind_context, get_logger
from mbc.runtime.security import Authorizer
from mbc.runtime.serving import GrpcServer, wait_for_shutdown_signal
from mbc.runtime.targets import address_list_target, router_target
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, participant_pb2

log = get_logger(__name__)

SERVICE_NAME = bot_pb2.DESCRIPTOR.services_by_name["Bot"].full_name


def create_server(config: BotConfig, engines: BotEngine | Sequence[BotEngine]) -> tuple[GrpcServer, int]:
    """One server for every bot hosted in the process (a call names its bot: `BotServicer`)."""
    server = GrpcServer(
        config.server,
        lambda s: bot_pb2_grpc.add_BotServicer_to_server(BotServicer(engines, Authorizer(config.server.tls.enabled)), s),
        [SERVICE_NAME],
    )
    return server, server.port


class BotChannels(ChannelPool):
    """The bot's channels to the router replicas, the store and other bots, per its server and
    channel settings. The routers are `router_address` (see BotConfig) or, when it is empty and etcd
    is configured, every replica registered in etcd, followed as they come and go (`start`)."""

    def __init__(self, config: BotConfig, etcd: EtcdClient | None = None) -> None:
        super().__init__(
            config.server.max_message_bytes,
            config.server.keepalive_time_ms,
            config.server.keepalive_timeout_ms,
            config.server.tls,
            config.channels,
        )
        self._watcher: RouterWatcher | None = None
        if config.router_address == NO_ROUTER:
            return
        if config.router_address or etcd is None:
            self.route_to(router_target(config.router_address or LOCAL_ROUTER))
        else:
            self._watcher = RouterWatcher(etcd, self._on_routers)

    def _on_routers(self, addresses: tuple[str, ...]) -> None:
        try:
            self.route_to(address_list_target(addresses))
        except ValueError as e:
            log.warning("router_addresses_unusable", addresses=list(addresses), error=str(e), kept=self.router_target)

    async def start(self, timeout: float = 5.0) -> None:
        """Follow the replicas in etcd (when configured to), and wait up to `timeout` seconds for the
        first list, so that the first messages already reach a router."""
        if self._watcher is not None:
            self._watcher.start()
            with contextlib.suppress(TimeoutError):
                await self._watcher.wait_ready(timeout)

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
        await super().close()


def participant_of(bot: Bot, identity: common_pb2.BotRef) -> participant_pb2.Participant:
    d = bot.definition
    return participant_pb2.Participant(
        bot_id=d.bot_id,
        instance_id=identity.instance_id,
        address=identity.address,
        group=d.group,
        collaboration=d.collaboration,
        intents=[participant_pb2.Intent(name=i.name, phrases=i.phrases) for i in d.intents],
        definition_version=d.version,
        software_version=__version__,
        display_name=d.display_name,
    )


def lexical_intents(bot: Bot) -> OwnIntents:
    """The default `OwnIntents` of a hosted bot: its phrases matched by words, no model."""
    return LexicalIntents((i.name, i.phrases) for i in bot.definition.intents)


REGISTRATION_CONCURRENCY = 32
"""Registrations (and leaves) a host runs at once: a host of hundreds of bots does not open
hundreds of etcd requests together."""


class HostedBot:
    """One bot of a host: its identity, conversation state, engine and (once started) registration."""

    def __init__(self, bot: Bot, identity: common_pb2.BotRef, state: StoreState | MemoryState, engine: BotEngine) -> None:
        self.bot = bot
        self.identity = identity
        self.state = state
        self.engine = engine
        self.registration: Registration | None = None


class BotHost:
    """The bots of one process (one or more definitions), served on one port, started and stopped in order."""

    def __init__(
        self,
        config: BotConfig,
        bots: Sequence[Bot] | None = None,
        own_intents: Callable[[Bot], OwnIntents] = lexical_intents,
    ) -> None:
        """`bots`: default, those of `config.definition_path`. `own_intents`: how each bot matches its
        own intents when no router answers (by words; bot_server/local_model.py for the model)."""
        self.config = config
        bots = list(bots) if bots is not None else load_bots(config.definition_path)
        if not bots:
            raise ValueError("a bot host needs at least one bot")
        self.etcd = EtcdClient(list(config.etcd_endpoints), access=config.etcd) if config.etcd_endpoints else None
        self.channels = BotChannels(config, self.etcd)
        self.store: ContextClient | None = None
        if config.store_address:
            self.store = ContextClient(self.channels.channel(config.store_address), config.call_timeout_seconds)
        # One lease for every hosted bot: one refresh per ttl/3 for the process, however many bots.
        self.lease = LeaseKeeper(self.etcd, config.lease_ttl_seconds, name="bot host") if self.etcd else None
        self._group_settings: dict[str, GroupSettingsCache] = {}
        if len({bot.bot_id for bot in bots}) != len(bots):
            raise ValueError(f"a host serves each bot id once: {sorted(b.bot_id for b in bots)}")
        self.hosted = {bot.bot_id: self._host(bot, own_intents(bot), len(bots) > 1) for bot in bots}
        self.server, self.port = create_server(config, [h.engine for h in self.hosted.values()])
        for hosted in self.hosted.values():
            hosted.identity.address = self.server.address

    def _host(self, bot: Bot, own: OwnIntents, several: bool) -> HostedBot:
        given = self.config.instance_id
        instance_id = (f"{given}.{bot.bot_id}" if several else given) if given else uuid.uuid4().hex[:12]
        identity = common_pb2.BotRef(bot_id=bot.bot_id, instance_id=instance_id)
        state: StoreState | MemoryState = (
            StoreState(self.store, bot.definition.context_namespace, bot.bot_id) if self.store is not None else MemoryState()
        )
        group = bot.definition.group
        settings = self._group_settings.setdefault(group, GroupSettingsCache(self.etcd, group))
        engine = BotEngine(
            bot,
            self.config,
            own,
            identity,
            self.channels,
            state,
            settings,
            self._presence(group),
        )
        return HostedBot(bot, identity, state, engine)

    def _presence(self, group: str) -> Callable[[common_pb2.BotRef], Awaitable[bool]] | None:
        """Whether a bot instance is registered in `group` (None without etcd: no registry)."""
        etcd = self.etcd
        if etcd is None:
            return None

        async def registered(bot: common_pb2.BotRef) -> bool:
            return await is_registered(etcd, group, bot)

        return registered

    @property
    def only(self) -> HostedBot:
        """The hosted bot of a single-bot host."""
        if len(self.hosted) != 1:
            raise ValueError(f"this host has {len(self.hosted)} bots")
        return next(iter(self.hosted.values()))

    @property
    def bot(self) -> Bot:
        return self.only.bot

    @property
    def identity(self) -> common_pb2.BotRef:
        return self.only.identity

    @property
    def address(self) -> str:
        return self.server.address

    async def _each(self, step: Callable[[HostedBot], Awaitable[None]]) -> None:
        """`step` for every hosted bot, `REGISTRATION_CONCURRENCY` at a time, each in its log context."""
        limit = asyncio.Semaphore(REGISTRATION_CONCURRENCY)

        async def run(hosted: HostedBot) -> None:
            async with limit:
                with bind_context(bot_id=hosted.bot.bot_id, instance_id=hosted.identity.instance_id):
                    await step(hosted)

        await asyncio.gather(*(run(h) for h in self.hosted.values()))

    async def _prepare(self, hosted: HostedBot) -> None:
        await hosted.engine.prepare()
        if isinstance(hosted.state, StoreState):
            await hosted.state.prepare(self.config.context_ttl_seconds)

    async def _register(self, hosted: HostedBot) -> None:
        """Every hosted bot's registration is made here, one per bot."""
        assert self.etcd is not None  # registering only with etcd configured (start)
        participant = participant_of(hosted.bot, hosted.identity)
        hosted.registration = Registration(self.etcd, participant, ttl=self.config.lease_ttl_seconds, lease=self.lease)
        await hosted.registration.start()
        log.info(
            "bot_serving",
            address=hosted.identity.address,
            group=hosted.bot.definition.group,
            intents=len(hosted.bot.definition.intents),
            registered=True,
        )

    async def start(self) -> None:
        await self._each(self._prepare)
        if self.etcd is not None:
            await self.etcd.connect()  # before serving: wrong etcd credentials stop the process at once
        await self.channels.start()
        await self.server.start()
        if self.etcd is not None:
            await self._each(self._register)
        else:
            for hosted in self.hosted.values():
                log.info("bot_serving", bot_id=hosted.bot.bot_id, address=hosted.identity.address, registered=False)
        await self.server.set_serving(True)
        log.info("host_serving", address=self.server.address, bots=len(self.hosted))

    async def stop(self, forget: bool = False) -> None:
        """NOT_SERVING, every hosted bot leaves the mesh (lease revoked), finish in-flight calls,
        close. Each bot's definition stays in etcd (the router answers that it is unavailable until
        an instance is back) unless `forget`: the bots leave their groups for good."""

        async def leave(hosted: HostedBot) -> None:
            if hosted.registration:
                await hosted.registration.stop(forget=forget)

        await self.server.set_serving(False)
        await self._each(leave)
        if self.lease is not None:
            await self.lease.stop()
        await self.server.stop()
        await self.channels.close()
        if self.etcd:
            await self.etcd.close()
        for hosted in self.hosted.values():
            hosted.engine.own.close()
            log.info("bot_stopped", bot_id=hosted.bot.bot_id, instance_id=hosted.identity.instance_id)


async def serve(
    config: BotConfig, bots: Sequence[Bot] | None = None, own_intents: Callable[[Bot], OwnIntents] = lexical_intents
) -> None:
    host = BotHost(config, bots, own_intents)
    await host.start()
    signal_name = await wait_for_shutdown_signal()
    log.info("shutdown_requested", signal=signal_name, bots=len(host.hosted))
    await host.stop()
