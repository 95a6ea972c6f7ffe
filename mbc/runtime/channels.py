"""Client channels to mesh servers, one per address, reused across calls.

Every channel gets the mesh's service config (protos/service_config.json, shipped in the package as
mbc/service_config.json): per-method timeouts (a cap: a shorter deadline given to a call wins) and
retries of UNAVAILABLE only, with exponential backoff and retry throttling. With a `TlsConfig`,
channels are mutual TLS (mbc/runtime/security.py). Every channel reconnects per a `ChannelConfig`
(bounded backoff: a peer restarted on its address is reached again within about a second).

A `ChannelPool` also replaces its channel to an address at once when a new instance registers
there (`bot(address, instance_id)`), or when told the peer is live again (`reset(address)`): the
new channel connects immediately instead of waiting out the old one's backoff, and the old one is
closed in the background once its calls in flight are done.

Router replicas are reached through one balanced channel (`ChannelPool.router`): gRPC's own
`round_robin` over every address of the target, each address used only while its gRPC health
status for the Router service is SERVING (client-side health checking), so a warming or draining
replica gets no Match, a dead one is skipped as soon as its connection breaks, and a Match it
failed with UNAVAILABLE is retried on another replica. A pool follows one router target
(`route_to`); a new target (the replicas in etcd changed) gets a new channel and the old one is
retired like a replaced instance channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from mbc.runtime.config import ChannelConfig, MiB, TlsConfig
from mbc.runtime.security import channel_credentials
from mbc.runtime.serving import channel_options
from mbc.runtime.tracing import client_interceptors
from mbc.v1 import bot_pb2_grpc, router_pb2, router_pb2_grpc

SERVICE_CONFIG_PATH = Path(__file__).resolve().parent / "service_config.json"
# The JSON text, as grpc's "grpc.service_config" channel argument takes it.
SERVICE_CONFIG = SERVICE_CONFIG_PATH.read_text()
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
"""The Router service's full name: the health status its balanced channels check."""


def balanced_service_config(health_service: str) -> str:
    """The mesh's service config (JSON text) with round robin over the target's addresses, each used
    only while its grpc.health.v1 status for `health_service` is SERVING. Retries are throttled more
    loosely than on a single-server channel: with replicas, a retry goes to another one, and every
    call in flight on a killed replica fails at once and must be retried."""
    config = json.loads(SERVICE_CONFIG)
    config["loadBalancingConfig"] = [{"round_robin": {}}]
    config["healthCheckConfig"] = {"serviceName": health_service}
    config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.2}
    return json.dumps(config)


ROUTER_SERVICE_CONFIG = balanced_service_config(ROUTER_SERVICE)


DEFAULT_CHANNEL_CONFIG = ChannelConfig()

# Instance ids remembered per address: an id seen there before (a stale candidate of a replaced
# instance) does not reset the channel again. A bot host serves hundreds of bots at one address,
# each its own instance: all of them are remembered, or calls to them would reset it in turn.
_KNOWN_INSTANCES = 1024


def open_channel(
    address: str, tls: TlsConfig = TlsConfig(), config: ChannelConfig = DEFAULT_CHANNEL_CONFIG, **kwargs
) -> grpc.aio.Channel:
    """A plaintext channel, or a mutual TLS one when `tls` is set, reconnecting per `config`
    (kwargs: grpc.aio channel arguments; options given there win over `config`'s)."""
    kwargs["options"] = with_backoff(kwargs.get("options") or (), config)
    return _open(address, channel_credentials(tls) if tls.enabled else None, **kwargs)


def with_backoff(options: Sequence[tuple[str, Any]], config: ChannelConfig) -> list[tuple[str, Any]]:
    """`options` with `config`'s reconnect backoff added, except the arguments `options` sets itself."""
    given = {name for name, _ in options}
    return [*(o for o in config.options() if o[0] not in given), *options]


def _open(address: str, credentials: grpc.ChannelCredentials | None, **kwargs) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, **kwargs)
    return grpc.aio.insecure_channel(address, **kwargs)


class _InFlight(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Counts a channel's calls in flight, so a replaced channel is closed once they are done."""

    def __init__(self) -> None:
        self.calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _started(self) -> None:
        self.calls += 1
        self._idle.clear()

    def _ended(self, _call: Any = None) -> None:
        self.calls -= 1
        if self.calls == 0:
            self._idle.set()

    async def _intercept(self, continuation, client_call_details, request):
        self._started()
        try:
            call = await continuation(client_call_details, request)
        except BaseException:
            self._ended()
            raise
        call.add_done_callback(self._ended)
        return call

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self._intercept(continuation, client_call_details, request)


class ChannelPool:
    """Opens one grpc.aio channel per address and keeps it; close them all with `close()`.

    Calls made through these channels carry the current trace id (mbc/runtime/tracing.py). Each
    channel has its own connection (a local subchannel pool), so a replacement channel never shares
    the backoff of the channel it replaces."""

    def __init__(
        self,
        max_message_bytes: int = 4 * MiB,
        keepalive_time_ms: int = 30_000,
        keepalive_timeout_ms: int = 10_000,
        tls: TlsConfig = TlsConfig(),
        config: ChannelConfig = DEFAULT_CHANNEL_CONFIG,
    ) -> None:
        self.tls = tls
        self.config = config
        self._credentials = channel_credentials(tls) if tls.enabled else None  # files read once, at start
        self._options = [
            *channel_options(max_message_bytes, keepalive_time_ms, keepalive_timeout_ms),
            *config.options(),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.service_config", SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
        ]
        self._channels: dict[str, tuple[grpc.aio.Channel, _InFlight]] = {}
        self._routers: dict[str, tuple[grpc.aio.Channel, _InFlight]] = {}  # balanced, by target
        self._router_target = ""
        self._instances: dict[str, deque[str]] = {}  # address -> instance ids seen there, newest last
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # replaced channels, closing

    @property
    def options(self) -> list[tuple[str, Any]]:
        """The grpc channel arguments of this pool's channels."""
        return list(self._options)

    def channel(self, address: str, instance_id: str = "") -> grpc.aio.Channel:
        """The channel to `address`; a fresh one when `instance_id` was never seen at that address
        before (a new instance registered there: the old channel may be waiting out a backoff)."""
        if instance_id and instance_id not in self._instances.get(address, ()):
            self.reset(address)
            self._instances.setdefault(address, deque(maxlen=_KNOWN_INSTANCES)).append(instance_id)
        pooled = self._channels.get(address)
        if pooled is None:
            pooled = self._channels[address] = self._open_counted(address, self._options)
        return pooled[0]

    def _open_counted(self, target: str, options: list[tuple[str, Any]]) -> tuple[grpc.aio.Channel, _InFlight]:
        in_flight = _InFlight()
        return _open(target, self._credentials, options=options, interceptors=[*client_interceptors(), in_flight]), in_flight

    def reset(self, address: str) -> None:
        """Replace the channel to `address` (if any) by a new one, which connects at once: for a
        peer known to be live again while the channel may be in TRANSIENT_FAILURE, waiting out its
        backoff. The old channel is closed in the background once its calls in flight are done
        (cancelled after `config.retired_grace_seconds`)."""
        self._retire_later(self._channels.pop(address, None))

    def _retire_later(self, pooled: tuple[grpc.aio.Channel, _InFlight] | None) -> None:
        if pooled is None:
            return
        task = asyncio.get_running_loop().create_task(self._retire(*pooled))
        self._retiring[task] = pooled[0]
        task.add_done_callback(self._retired)

    async def _retire(self, channel: grpc.aio.Channel, in_flight: _InFlight) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(in_flight.wait_idle(), self.config.retired_grace_seconds)
        await channel.close()

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failed close is no one's concern once the channel is replaced

    def bot(self, address: str, instance_id: str = "") -> bot_pb2_grpc.BotStub:
        """A Bot stub for the instance `instance_id` at `address` (see `channel`)."""
        return bot_pb2_grpc.BotStub(self.channel(address, instance_id))

    def router(self, target: str) -> router_pb2_grpc.RouterStub:
        """A Router stub over the replicas of `target` (a host:port, an ipv4: list, dns:///…: see
        `router_target`), balanced round robin over the SERVING ones."""
        pooled = self._routers.get(target)
        if pooled is None:
            options = [o for o in self._options if o[0] != "grpc.service_config"]
            options.append(("grpc.service_config", ROUTER_SERVICE_CONFIG))
            pooled = self._routers[target] = self._open_counted(target, options)
            pooled[0].get_state(try_to_connect=True)  # connected (and health-checked) before the first Match
        return router_pb2_grpc.RouterStub(pooled[0])

    @property
    def router_target(self) -> str:
        """The router target `current_router` calls ("" for none)."""
        return self._router_target

    def route_to(self, target: str) -> None:
        """Make `target` the routers `current_router` calls; the channel of the previous target is
        closed once its calls in flight are done (new calls go to the new one at once)."""
        previous, self._router_target = self._router_target, target
        if previous != target:
            self._retire_later(self._routers.pop(previous, None))
            if target:
                self.router(target)

    def current_router(self) -> router_pb2_grpc.RouterStub | None:
        """A Router stub over the replicas of the current target; None when there is none."""
        return self.router(self._router_target) if self._router_target else None

    async def close(self) -> None:
        """Close every channel, cancelling calls in flight (those on replaced channels too)."""
        channels = [*self._channels.values(), *self._routers.values()]
        self._channels, self._routers = {}, {}
        retiring, self._retiring = self._retiring, {}
        for task in retiring:
            task.cancel()  # stops its wait (channel.close() without grace does not wait): closed below
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in [*(c for c, _ in channels), *retiring.values()]:
            await channel.close()  # a no-op on a closed one
