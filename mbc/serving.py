"""What every mbc gRPC server has: limits from config, health, reflection, port reporting,
and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from mbc.config import ServerConfig
from mbc.logs import get_logger

log = get_logger(__name__)


def channel_options(max_message_bytes: int, keepalive_time_ms: int, keepalive_timeout_ms: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
    ]


class GrpcServer:
    """A grpc.aio server with health and reflection, bound per `ServerConfig`.

    Services are added by `add_services(server)`; `service_names` are their full names, reported
    NOT_SERVING by health until `set_serving(True)`.
    """

    def __init__(
        self,
        config: ServerConfig,
        add_services: Callable[[grpc.aio.Server], None],
        service_names: Sequence[str],
    ) -> None:
        self.config = config
        self.service_names = tuple(service_names)
        options = channel_options(config.max_message_bytes, config.keepalive_time_ms, config.keepalive_timeout_ms)
        options += [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        add_services(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")

    @property
    def address(self) -> str:
        """host:port other components should dial."""
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        if self.config.port_file:
            path = Path(self.config.port_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(str(self.port))
            tmp.replace(path)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Report NOT_SERVING, then let in-flight calls finish within the grace period."""
        await self.set_serving(False)
        await self.server.stop(self.config.grace_seconds)


async def wait_for_shutdown_signal() -> str:
    """Return the name of the first SIGTERM or SIGINT received."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def remaining_seconds(context: grpc.aio.ServicerContext, default: float) -> float:
    """The caller's remaining time, or `default` when it set no deadline.

    gRPC Python does not pass deadlines on to outgoing calls: every outgoing call takes this.
    """
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return default
    return max(0.0, remaining)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    log.info("rpc_rejected", code=code.name, reason=message)
    await context.abort(code, message)


Shutdown = Callable[[], Awaitable[None]]
