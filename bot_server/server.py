"""The bot process: serve the Bot service, register in etcd, leave cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import uuid

from bot_server.bot import Bot
from bot_server.engine import BotEngine
from bot_server.servicer import BotServicer
from bot_server.state import MemoryState, StoreState
from discovery import EtcdClient, Registration
from discovery.groups import GroupSettingsCache
from discovery.presence import is_registered
from discovery.routers import RouterWatcher
from mbc import __version__
from mbc.client.context import ContextClient
from mbc.runtime.channels import ChannelPool
from mbc.runtime.config import LOCAL_ROUTER, NO_ROUTER, BotConfig
from mbc.runtime.encoder import Encoder
from mbc.runtime.logs import bind_context, get_logger
from mbc.runtime.security import Authorizer
from mbc.runtime.serving import GrpcServer, wait_for_shutdown_signal
from mbc.runtime.targets import address_list_target, router_target
from mbc.v1 import bot_pb2, bot_pb2_grpc, common_pb2, participant_pb2

log = get_logger(__name__)

SERVICE_NAME = bot_pb2.DESCRIPTOR.services_by_name["Bot"].full_name


def create_server(config: BotConfig, engine: BotEngine) -> tuple[GrpcServer, int]:
    server = GrpcServer(
        config.server,
        lambda s: bot_pb2_grpc.add_BotServicer_to_server(BotServicer(engine, Authorizer(config.server.tls.enabled)), s),
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


class BotProcess:
    """One bot instance: server, engine and etcd registration, started and stopped in order."""

    def __init__(self, config: BotConfig, bot: Bot | None = None, encoder: Encoder | None = None) -> None:
        self.config = config
        self.bot = bot or Bot.from_file(config.definition_path)
        self.encoder = encoder or Encoder(config.encoder)
        self.etcd = EtcdClient(list(config.etcd_endpoints), access=config.etcd) if config.etcd_endpoints else None
        self.channels = BotChannels(config, self.etcd)
        self.identity = common_pb2.BotRef(bot_id=self.bot.bot_id, instance_id=config.instance_id or uuid.uuid4().hex[:12])
        self.state: StoreState | MemoryState
        if config.store_address:
            client = ContextClient(self.channels.channel(config.store_address), config.call_timeout_seconds)
            self.state = StoreState(client, self.bot.definition.context_namespace, self.bot.bot_id)
        else:
            self.state = MemoryState()
        self.engine = BotEngine(
            self.bot,
            config,
            self.encoder,
            self.identity,
            self.channels,
            self.state,
            GroupSettingsCache(self.etcd, self.bot.definition.group),
            self._is_registered if self.etcd else None,
        )
        self.server, self.port = create_server(config, self.engine)
        self.identity.address = self.server.address
        self.registration: Registration | None = None

    async def _is_registered(self, bot: common_pb2.BotRef) -> bool:
        assert self.etcd is not None  # handed to the engine only when etcd is configured (__init__)
        return await is_registered(self.etcd, self.bot.definition.group, bot)

    async def start(self) -> None:
        with bind_context(bot_id=self.bot.bot_id, instance_id=self.identity.instance_id):
            await self.engine.prepare()
            if isinstance(self.state, StoreState):
                await self.state.prepare(self.config.context_ttl_seconds)
            if self.etcd is not None:
                await self.etcd.connect()  # before serving: wrong etcd credentials stop the bot at once
            await self.channels.start()
            await self.server.start()
            if self.etcd is not None:
                self.registration = Registration(
                    self.etcd, participant_of(self.bot, self.identity), ttl=self.config.lease_ttl_seconds
                )
                await self.registration.start()
            await self.server.set_serving(True)
            log.info(
                "bot_serving",
                address=self.identity.address,
                group=self.bot.definition.group,
                intents=len(self.bot.definition.intents),
                registered=self.registration is not None,
            )

    async def stop(self, forget: bool = False) -> None:
        """NOT_SERVING, leave the mesh (lease revoked), finish in-flight calls, close. The bot's
        definition stays in etcd (the router answers that it is unavailable until an instance is
        back) unless `forget`: the bot leaves its group for good."""
        with bind_context(bot_id=self.bot.bot_id, instance_id=self.identity.instance_id):
            await self.server.set_serving(False)
            if self.registration:
                await self.registration.stop(forget=forget)
            await self.server.stop()
            await self.channels.close()
            if self.etcd:
                await self.etcd.close()
            self.encoder.close()
            log.info("bot_stopped")


async def serve(config: BotConfig, bot: Bot | None = None) -> None:
    process = BotProcess(config, bot)
    await process.start()
    signal_name = await wait_for_shutdown_signal()
    log.info("shutdown_requested", signal=signal_name, bot_id=process.bot.bot_id)
    await process.stop()
