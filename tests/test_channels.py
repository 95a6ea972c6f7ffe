"""Channels reconnect fast (mbc/runtime/channels.py): a bounded reconnect backoff from `ChannelConfig`,
and a fresh channel when a new instance registers at an address (or on `ChannelPool.reset`).

In-process gRPC servers on port 0, stopped and started again on the same port."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc._cython.cygrpc import UsageError

from bot_server.server import BotChannels
from mbc.cli import main as cli
from mbc.client.gateway import Conversation
from mbc.runtime.channels import ChannelPool, open_channel, with_backoff
from mbc.runtime.config import BotConfig, ChannelConfig

pytestmark = pytest.mark.integration  # gRPC servers

METHOD = "/mbc.test.Echo/Echo"
SLOW = b"slow"  # a request the server answers after SLOW_SECONDS
SLOW_SECONDS = 0.5


class Server:
    """An echo server that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if request == SLOW:
                await asyncio.sleep(SLOW_SECONDS)
            return request

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("mbc.test.Echo", {"Echo": handler})])
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port
        await server.start()
        self._server = server

    async def stop(self) -> None:
        assert self._server is not None
        await self._server.stop(None)
        self._server = None


@pytest.fixture
async def server():
    s = Server()
    await s.start()
    yield s
    if s._server is not None:
        await s.stop()


async def call(channel: grpc.aio.Channel, request: bytes = b"hi", timeout: float = 1.0, wait_for_ready: bool = False) -> bytes:
    return await channel.unary_unary(METHOD)(request, timeout=timeout, wait_for_ready=wait_for_ready)


async def fails(channel: grpc.aio.Channel, timeout: float = 0.3) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call(channel, timeout=timeout)
    return e.value.code()


async def seconds_until_answered(channel: grpc.aio.Channel) -> float:
    """How long until a call waiting for the channel to be ready is answered."""
    start = time.monotonic()
    assert await call(channel, timeout=10.0, wait_for_ready=True) == b"hi"
    return time.monotonic() - start


async def test_a_restarted_server_is_reached_again_within_the_backoff_bound(server):
    pool = ChannelPool()  # the default ChannelConfig: 100 ms first, at most 1 s between attempts
    channel = pool.channel(server.address)
    try:
        assert await call(channel) == b"hi"
        await server.stop()
        # Down for 3 s while calls keep failing: the backoff grows to its bound.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert await fails(channel, timeout=0.2) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            await asyncio.sleep(0.1)
        await server.start()
        # At most max_reconnect_backoff_ms (1 s) + 20% jitter, plus the connection itself.
        assert await seconds_until_answered(channel) < 1.5
        assert pool.channel(server.address) is channel  # the same channel reconnected
    finally:
        await pool.close()


async def test_the_first_retry_waits_the_initial_backoff_of_the_config_not_grpcs_1s(server):
    """One refused connection, the server back at once: gRPC's default waits about 1 s (0.8 to 1.2)
    before the next attempt; the mesh's channels 100 ms (80 to 120)."""
    plain = grpc.aio.insecure_channel(server.address)  # gRPC's defaults
    bounded = open_channel(server.address)
    try:
        for channel in (plain, bounded):
            assert await call(channel) == b"hi"
        await server.stop()
        for channel in (plain, bounded):
            assert await fails(channel) == grpc.StatusCode.UNAVAILABLE  # refused: TRANSIENT_FAILURE, backoff
        await server.start()
        waits = await asyncio.gather(seconds_until_answered(plain), seconds_until_answered(bounded))
        assert waits[0] > 0.6 and waits[1] < 0.4, waits
    finally:
        await plain.close()
        await bounded.close()


SLOW_BACKOFF = ChannelConfig(initial_reconnect_backoff_ms=20_000, max_reconnect_backoff_ms=20_000)


async def test_a_new_instance_at_the_address_gets_a_fresh_channel_at_once(server):
    # A pool whose channels wait 20 s between connection attempts, built as the bot builds it.
    pool = BotChannels(BotConfig(channels=SLOW_BACKOFF))
    try:
        old = pool.channel(server.address, "instance-a")
        assert await call(old) == b"hi"
        await server.stop()
        assert await fails(old) == grpc.StatusCode.UNAVAILABLE
        await server.start()  # the restarted bot, registered as instance-b
        # The old channel is waiting out its 20 s backoff (the config reached the channel) ...
        assert pool.channel(server.address, "instance-a") is old
        assert await fails(old, timeout=0.5) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # ... the new instance's first call goes through a fresh channel, without waiting.
        stub = pool.bot(server.address, "instance-b")
        fresh = pool.channel(server.address, "instance-b")
        assert fresh is not old and stub is not None
        start = time.monotonic()
        assert await call(fresh, timeout=2.0) == b"hi"
        assert time.monotonic() - start < 0.5
        # A stale candidate naming the old instance does not reset it again; no id keeps it too.
        assert pool.channel(server.address, "instance-a") is fresh
        assert pool.channel(server.address) is fresh
    finally:
        await pool.close()


async def test_a_replaced_channel_lets_its_calls_in_flight_finish(server):
    pool = ChannelPool()
    try:
        old = pool.channel(server.address, "instance-a")
        in_flight = asyncio.ensure_future(call(old, SLOW, timeout=5.0))
        await asyncio.sleep(0.1)
        fresh = pool.channel(server.address, "instance-b")
        assert fresh is not old
        assert await call(fresh) == b"hi"
        assert await in_flight == SLOW  # not cancelled by the replacement
        await asyncio.sleep(0.1)
        with pytest.raises(UsageError):  # the retired channel is closed once its calls are done
            await call(old)
        # A replaced channel without calls in flight is closed at once.
        pool.reset(server.address)
        await asyncio.sleep(0.1)
        with pytest.raises(UsageError):
            await call(fresh)
    finally:
        await pool.close()


async def test_reset_reconnects_a_failed_channel_at_once(server):
    pool = ChannelPool(config=SLOW_BACKOFF)
    try:
        old = pool.channel(server.address)
        assert await call(old) == b"hi"
        await server.stop()
        assert await fails(old) == grpc.StatusCode.UNAVAILABLE
        await server.start()
        pool.reset(server.address)  # the caller knows the peer is live again
        fresh = pool.channel(server.address)
        assert fresh is not old
        start = time.monotonic()
        assert await call(fresh, timeout=2.0) == b"hi"
        assert time.monotonic() - start < 0.5
        pool.reset("127.0.0.1:1")  # no channel there: nothing to do
    finally:
        await pool.close()


async def test_close_cancels_calls_on_replaced_channels_too(server):
    pool = ChannelPool()
    old = pool.channel(server.address)
    in_flight = asyncio.ensure_future(call(old, SLOW, timeout=5.0))
    await asyncio.sleep(0.1)
    pool.reset(server.address)
    await asyncio.wait_for(pool.close(), 2.0)
    with pytest.raises(asyncio.CancelledError):
        await in_flight


def test_channel_settings_reach_every_channel_options(monkeypatch):
    names = ("grpc.initial_reconnect_backoff_ms", "grpc.min_reconnect_backoff_ms", "grpc.max_reconnect_backoff_ms")
    assert ChannelConfig().options() == list(zip(names, (100, 1000, 1000), strict=True))
    # From the environment and flags of `mbc bot` to the bot's pool.
    monkeypatch.setenv("MBC_BOT__CHANNELS__MAX_RECONNECT_BACKOFF_MS", "3000")
    args = cli.build_parser().parse_args(["bot", "cards.yaml", "--initial-reconnect-backoff-ms", "200"])
    config = cli.effective_config(args.command, args)
    assert config.channels == ChannelConfig(initial_reconnect_backoff_ms=200, max_reconnect_backoff_ms=3000)
    options = dict(BotChannels(config).options)
    assert [options[n] for n in names] == [200, 1000, 3000]
    # The gateway helper's pool.
    conversation = Conversation("127.0.0.1:1", channel_config=config.channels)
    assert conversation._channels.config == config.channels
    with pytest.raises(ValueError, match="channels.max_reconnect_backoff_ms must be at least 500"):
        ChannelConfig(initial_reconnect_backoff_ms=500, max_reconnect_backoff_ms=100)


def test_open_channel_options_given_win_over_the_config():
    options = with_backoff([("grpc.max_reconnect_backoff_ms", 5)], ChannelConfig())
    assert dict(options)["grpc.max_reconnect_backoff_ms"] == 5
    assert dict(options)["grpc.initial_reconnect_backoff_ms"] == 100
    assert len(options) == 3


def test_bot_help_lists_the_channel_settings(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--initial-reconnect-backoff-ms", "--min-reconnect-backoff-ms", "--max-reconnect-backoff-ms"):
        assert flag in text
