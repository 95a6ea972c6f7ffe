"""Client channels to mesh servers, one per address, reused across calls."""

from __future__ import annotations

import grpc

from mbc.config import MiB
from mbc.serving import channel_options
from mbc.v1 import bot_pb2_grpc, router_pb2_grpc


class ChannelPool:
    """Opens one grpc.aio channel per address and keeps it; close them all with `close()`."""

    def __init__(self, max_message_bytes: int = 4 * MiB, keepalive_time_ms: int = 30_000, keepalive_timeout_ms: int = 10_000) -> None:
        self._options = channel_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return channel

    def bot(self, address: str) -> bot_pb2_grpc.BotStub:
        return bot_pb2_grpc.BotStub(self.channel(address))

    def router(self, address: str) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(address))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
