"""A client for channel gateways: send a conversation's messages to the bot that owns it.

    async with Conversation(entry_address="127.0.0.1:50061", store_address="127.0.0.1:50052",
                            router_target="127.0.0.1:50051") as chat:
        response = await chat.send("I lost my card")
        for reply in response.replies: print(reply.bot_id, reply.text)

Each response names the owner (the bot: group and bot_id, and the instance's address), and the next
message goes there. With a store, a gateway that does not know the owner (another replica took the
previous message, or it restarted) asks the Context Session Store who owns the conversation; a new
conversation goes to the entry bot. Each message names the owner's bot_id (an address may host
several bots). When the owner instance cannot be reached (UNAVAILABLE: it died), no longer hosts the
bot (NOT_FOUND) or refuses the conversation (FAILED_PRECONDITION) and the store names no other
instance, the gateway asks a router (`router_target`) to Locate a live instance of the owner bot and
sends there; with no router, or no live instance, the message goes to the entry bot, which takes the
conversation over.
With mTLS (`tls`, a certificate for the identity gateway/<name>), every call presents it. The
channels reconnect per `channel_config` (bounded backoff, see `ChannelConfig`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import grpc

from mbc.client.context import ContextClient
from mbc.runtime import targets
from mbc.runtime.channels import DEFAULT_CHANNEL_CONFIG, ChannelPool
from mbc.runtime.config import ChannelConfig, TlsConfig
from mbc.runtime.logs import get_logger
from mbc.v1 import bot_pb2, router_pb2

log = get_logger(__name__)

MAX_SENDS = 4
"""Addresses a message is sent to at most: the owner, then where the store, a router or the entry bot point."""


class Conversation:
    def __init__(
        self,
        entry_address: str,
        conversation_id: str | None = None,
        consumer_id: str = "",
        channel_metadata: Mapping[str, str] | None = None,
        timeout_seconds: float = 10.0,
        channels: ChannelPool | None = None,
        store_address: str = "",
        tls: TlsConfig = TlsConfig(),
        channel_config: ChannelConfig = DEFAULT_CHANNEL_CONFIG,
        router_target: str = "",
        entry_bot_id: str = "",
    ) -> None:
        self.conversation_id = conversation_id or uuid.uuid4().hex
        self.consumer_id = consumer_id
        self.channel_metadata = dict(channel_metadata or {})
        self.timeout_seconds = timeout_seconds
        self.entry_address = entry_address
        self.entry_bot_id = entry_bot_id
        """The entry bot's id: required when its address hosts several bots (`mbc bot` with several
        definitions); "": the address's only bot."""
        self.router_target = targets.router_target(router_target)
        """Routers to Locate a live instance of the owner bot (host:port, a comma list of IP:port, or
        a gRPC target such as dns:///routers:50051), balanced over the SERVING ones; "": none."""
        self.owner_address = ""
        self.owner_bot_id = ""
        self.owner_group = ""
        self._own_channels = channels is None
        self._channels = channels or ChannelPool(tls=tls, config=channel_config)
        self._store = ContextClient(self._channels.channel(store_address), timeout_seconds) if store_address else None

    async def _find_owner(self) -> tuple[str, str]:
        """(address, bot id) of the owner the store names, else of the entry bot."""
        if self._store is not None:
            ownership, _ = await self._store.get_owner(self.conversation_id)
            if ownership is not None and ownership.owner.address:
                self.owner_bot_id = ownership.owner.bot_id
                self.owner_group = ownership.owner.group
                return ownership.owner.address, ownership.owner.bot_id
        return self.entry_address, self.entry_bot_id

    async def _live_instance(self, failed: list[str]) -> tuple[str, str] | None:
        """(address, bot id) of a live instance of the owner bot not in `failed`, per a router; None
        with no router, no known owner, no such instance, or no answer."""
        if not self.router_target or not self.owner_bot_id:
            return None
        request = router_pb2.LocateRequest(group=self.owner_group, bot_id=self.owner_bot_id)
        try:
            located = await self._channels.router(self.router_target).Locate(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as e:
            log.warning("locate_failed", bot_id=self.owner_bot_id, code=e.code().name, detail=e.details())
            return None
        for instance in located.instances:
            if instance.address not in failed:
                self._channels.channel(instance.address, instance.instance_id)  # a new instance there: a new channel
                return instance.address, instance.bot_id
        return None

    async def _send_again_to(self, error: grpc.aio.AioRpcError, failed: list[str]) -> tuple[str, str] | None:
        """Where (address, bot id) to send a message once more after `error` from the last of
        `failed`, or None.

        The instance refused the conversation (FAILED_PRECONDITION: another bot or instance holds
        it): where the store says now, unless that is where it failed; then a live instance of the
        owner bot. The owner cannot be reached (UNAVAILABLE: it died) or its address no longer hosts
        it (NOT_FOUND): a live instance of its bot, else the entry bot, which takes over a
        conversation whose owner instance is gone."""
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION and self._store is not None:
            owner = await self._find_owner()
            if owner[0] not in failed:
                return owner
            return await self._live_instance(failed)
        if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
            live = await self._live_instance(failed)
            if live is None and self.entry_address not in failed:
                return self.entry_address, self.entry_bot_id
            return live
        return None

    async def send(self, text: str) -> bot_pb2.RespondResponse:
        request = bot_pb2.RespondRequest(
            conversation_id=self.conversation_id,
            consumer_id=self.consumer_id,
            text=text,
            channel_metadata=self.channel_metadata,
        )
        # The bot is named with its address: an address may host several bots.
        address, request.bot_id = (self.owner_address, self.owner_bot_id) if self.owner_address else await self._find_owner()
        failed: list[str] = []
        while True:
            try:
                response = await self._channels.bot(address).Respond(request, timeout=self.timeout_seconds)
                break
            except grpc.aio.AioRpcError as e:
                failed.append(address)
                retry = await self._send_again_to(e, failed) if len(failed) < MAX_SENDS else None
                if retry is None:
                    raise
                log.info("gateway_resending", code=e.code().name, failed=address, to=retry[0])
                address, request.bot_id = retry
        if response.owner.address:
            self.owner_address = response.owner.address
            self.owner_bot_id = response.owner.bot_id
            self.owner_group = response.owner.group
        return response

    async def close(self) -> None:
        if self._own_channels:
            await self._channels.close()

    async def __aenter__(self) -> Conversation:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
