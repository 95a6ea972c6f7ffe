"""A client for channel gateways: send a conversation's messages to the bot that owns it.

    async with Conversation(entry_address="127.0.0.1:50061", store_address="127.0.0.1:50052") as chat:
        response = await chat.send("I lost my card")
        for reply in response.replies: print(reply.bot_id, reply.text)

Each response names the owner, and the next message goes there. With a store, a gateway that
does not know the owner (another replica took the previous message, or it restarted) asks the
Context Session Store who owns the conversation; a new conversation goes to the entry bot, and so
does a message whose owner cannot be reached (the entry bot takes the conversation over once the
owner's registration is gone).
With mTLS (`tls`, a certificate for the identity gateway/<name>), every call presents it. The
channels reconnect per `channel_config` (bounded backoff, see `ChannelConfig`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import grpc

from mbc.client.context import ContextClient
from mbc.runtime.channels import DEFAULT_CHANNEL_CONFIG, ChannelPool
from mbc.runtime.config import ChannelConfig, TlsConfig
from mbc.v1 import bot_pb2


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
    ) -> None:
        self.conversation_id = conversation_id or uuid.uuid4().hex
        self.consumer_id = consumer_id
        self.channel_metadata = dict(channel_metadata or {})
        self.timeout_seconds = timeout_seconds
        self.entry_address = entry_address
        self.owner_address = ""
        self.owner_bot_id = ""
        self._own_channels = channels is None
        self._channels = channels or ChannelPool(tls=tls, config=channel_config)
        self._store = ContextClient(self._channels.channel(store_address), timeout_seconds) if store_address else None

    async def _find_owner(self) -> str:
        if self._store is not None:
            ownership, _ = await self._store.get_owner(self.conversation_id)
            if ownership is not None and ownership.owner.address:
                self.owner_bot_id = ownership.owner.bot_id
                return ownership.owner.address
        return self.entry_address

    async def _send_again_to(self, error: grpc.aio.AioRpcError, address: str) -> str | None:
        """Where to send a message once more after `error` from `address`, or None.

        Someone else moved the conversation (FAILED_PRECONDITION): where the store says now. The
        owner cannot be reached (UNAVAILABLE: it died): the entry bot, which takes over a
        conversation whose owner instance is no longer registered."""
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION and self._store is not None:
            return await self._find_owner()
        if error.code() == grpc.StatusCode.UNAVAILABLE and address != self.entry_address:
            return self.entry_address
        return None

    async def send(self, text: str) -> bot_pb2.RespondResponse:
        request = bot_pb2.RespondRequest(
            conversation_id=self.conversation_id,
            consumer_id=self.consumer_id,
            text=text,
            channel_metadata=self.channel_metadata,
        )
        address = self.owner_address or await self._find_owner()
        try:
            response = await self._channels.bot(address).Respond(request, timeout=self.timeout_seconds)
        except grpc.aio.AioRpcError as e:
            retry_address = await self._send_again_to(e, address)
            if retry_address is None:
                raise
            response = await self._channels.bot(retry_address).Respond(request, timeout=self.timeout_seconds)
        if response.owner.address:
            self.owner_address = response.owner.address
            self.owner_bot_id = response.owner.bot_id
        return response

    async def close(self) -> None:
        if self._own_channels:
            await self._channels.close()

    async def __aenter__(self) -> Conversation:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
