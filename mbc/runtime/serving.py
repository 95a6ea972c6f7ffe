"""What every mbc gRPC server has: limits from config, health, reflection, port reporting,
a graceful stop on SIGTERM, Prometheus metrics and trace ids (`ObservingInterceptor`), and a
bounded connection age so that clients spread over replicas that joined later."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from mbc.runtime import metrics, security, tracing
from mbc.runtime.config import ServerConfig
from mbc.runtime.decoding import DecodingInterceptor
from mbc.runtime.logs import bind_context, get_logger

log = get_logger(__name__)


def channel_options(max_message_bytes: int, keepalive_time_ms: int, keepalive_timeout_ms: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
    ]


class ObservingInterceptor(grpc.aio.ServerInterceptor):
    """Every unary RPC: its trace id (taken from the metadata or new, bound to the log context and
    passed on by `ChannelPool` channels), and Prometheus counts by method and status with latency."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        service, method = metrics.split_method(handler_call_details.method)
        behavior = handler.unary_unary
        metadata = handler_call_details.invocation_metadata

        async def observed(request, context: grpc.aio.ServicerContext):
            trace_id = tracing.incoming_trace_id(metadata)
            token = tracing.set_trace_id(trace_id)
            metrics.RPC_STARTED.labels(service, method).inc()
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                with bind_context(trace_id=trace_id):
                    response = await behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                metrics.RPC_HANDLED.labels(service, method, getattr(code, "name", str(code))).inc()
                metrics.RPC_LATENCY.labels(service, method).observe(time.perf_counter() - start)
                tracing.reset_trace_id(token)

        return handler._replace(unary_unary=observed)


class GrpcServer:
    """A grpc.aio server with health and reflection, bound per `ServerConfig`: plaintext, or mutual
    TLS with `config.tls` (clients must present a certificate signed by its CA).

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
        if config.max_connection_age_ms:  # clients reconnect (and re-resolve) now and then: replicas rebalance
            options += [
                ("grpc.max_connection_age_ms", config.max_connection_age_ms),
                ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_ms),
            ]
        # Unreadable certificate files stop the process here, before anything is created.
        credentials = security.server_credentials(config.tls) if config.tls.enabled else None
        if config.otel:
            tracing.enable_otel(self.service_names[0] if self.service_names else "mbc", config.otel_exporter)
        self.server = grpc.aio.server(
            options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            interceptors=[*tracing.otel_server_interceptors(), ObservingInterceptor(), DecodingInterceptor()],
        )
        self.metrics: metrics.MetricsEndpoint | None = None
        add_services(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        target = f"{config.host}:{config.port}"
        if credentials is not None:
            self.port = self.server.add_secure_port(target, credentials)
        else:
            self.port = self.server.add_insecure_port(target)
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")

    @property
    def address(self) -> str:
        """host:port other components should dial."""
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        """Port of the /metrics endpoint; 0 while it is not serving."""
        return self.metrics.port if self.metrics else 0

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        if self.config.metrics_port >= 0 and self.metrics is None:
            self.metrics = metrics.MetricsEndpoint(self.config.host, self.config.metrics_port)
            log.info(
                "metrics_serving",
                address=f"{self.config.advertise_host or self.config.host}:{self.metrics.port}",
                metrics_port=self.metrics.port,
            )
            if self.config.port_file:  # before the port file: whoever waits for that one finds both
                _write_atomically(Path(metrics.metrics_port_file(self.config.port_file)), str(self.metrics.port))
        if self.config.port_file:
            _write_atomically(Path(self.config.port_file), str(self.port))

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Report NOT_SERVING, then let in-flight calls finish within the grace period."""
        await self.set_serving(False)
        await self.server.stop(self.config.grace_seconds)
        if self.metrics is not None:
            endpoint, self.metrics = self.metrics, None
            await asyncio.to_thread(endpoint.close)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def wait_for_shutdown_signal() -> str:
    """Return the name of the first SIGTERM or SIGINT received."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
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
