"""A client for channel gateways: send a conversation's messages to the bot that owns it.

    async with Conversation(entry_address="127.0.0.1:50061", conversation_id="c-1") as chat:
        response = await chat.send("I lost my card")
        for reply in response.replies: print(reply.bot_id, reply.text)

The first message goes to the entry bot; each response names the owner, and the next message
goes there.
"""

from __future__ import annotations

import uuid
from typing import Mapping

from mbc.channels import ChannelPool
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
    ) -> None:
        self.conversation_id = conversation_id or uuid.uuid4().hex
        self.consumer_id = consumer_id
        self.channel_metadata = dict(channel_metadata or {})
        self.timeout_seconds = timeout_seconds
        self.owner_address = entry_address
        self.owner_bot_id = ""
        self._own_channels = channels is None
        self._channels = channels or ChannelPool()

    async def send(self, text: str) -> bot_pb2.RespondResponse:
        request = bot_pb2.RespondRequest(
            conversation_id=self.conversation_id,
            consumer_id=self.consumer_id,
            text=text,
            channel_metadata=self.channel_metadata,
        )
        response = await self._channels.bot(self.owner_address).Respond(request, timeout=self.timeout_seconds)
        if response.owner.address:
            self.owner_address = response.owner.address
            self.owner_bot_id = response.owner.bot_id
        return response

    async def close(self) -> None:
        if self._own_channels:
            await self._channels.close()

    async def __aenter__(self) -> "Conversation":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
