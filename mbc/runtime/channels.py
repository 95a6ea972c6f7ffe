"""Client channels to mesh servers, one per address, reused across calls.

Every channel gets the mesh's service config (protos/service_config.json, shipped in the package as
mbc/service_config.json): per-method timeouts (a cap: a shorter deadline given to a call wins) and
retries of UNAVAILABLE only, with exponential backoff and retry throttling. With a `TlsConfig`,
channels are mutual TLS (mbc/runtime/security.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from mbc.runtime.config import MiB, TlsConfig
from mbc.runtime.security import channel_credentials
from mbc.runtime.serving import channel_options
from mbc.runtime.tracing import client_interceptors
from mbc.v1 import bot_pb2_grpc, router_pb2_grpc

SERVICE_CONFIG_PATH = Path(__file__).resolve().parent / "service_config.json"
# The JSON text, as grpc's "grpc.service_config" channel argument takes it.
SERVICE_CONFIG = SERVICE_CONFIG_PATH.read_text()


def open_channel(address: str, tls: TlsConfig = TlsConfig(), **kwargs) -> grpc.aio.Channel:
    """A plaintext channel, or a mutual TLS one when `tls` is set (kwargs: grpc.aio channel arguments)."""
    return _open(address, channel_credentials(tls) if tls.enabled else None, **kwargs)


def _open(address: str, credentials: grpc.ChannelCredentials | None, **kwargs) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, **kwargs)
    return grpc.aio.insecure_channel(address, **kwargs)


class ChannelPool:
    """Opens one grpc.aio channel per address and keeps it; close them all with `close()`.

    Calls made through these channels carry the current trace id (mbc/runtime/tracing.py)."""

    def __init__(
        self,
        max_message_bytes: int = 4 * MiB,
        keepalive_time_ms: int = 30_000,
        keepalive_timeout_ms: int = 10_000,
        tls: TlsConfig = TlsConfig(),
    ) -> None:
        self.tls = tls
        self._credentials = channel_credentials(tls) if tls.enabled else None  # files read once, at start
        self._options = [
            *channel_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms),
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = _open(
                address, self._credentials, options=self._options, interceptors=client_interceptors()
            )
        return channel

    def bot(self, address: str) -> bot_pb2_grpc.BotStub:
        return bot_pb2_grpc.BotStub(self.channel(address))

    def router(self, address: str) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(address))

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
