"""Following a value kept in etcd: read it, hand it on, and again whenever a key under its prefix
changes and the value read differs.

What the router follows this way (the calibration set, the groups' decision costs) is small and
changes seldom, so a change event is only a signal: the value is read again whole, at the newest
revision, and handed on only if it differs from the last one. Errors back off and start over from
a fresh read (a compacted watch included); only `stop()` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from discovery.background import BackgroundLoop
from discovery.errors import EtcdError, EtcdUnavailable, WatchCompacted
from discovery.etcd_client import EtcdClient
from mbc.runtime.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")
_RETRY_FIRST, _RETRY_CAP = 0.2, 2.0


class EtcdFollower(BackgroundLoop, Generic[T]):
    """Calls `on_change(value)` with what `read(client)` returns: once read first, then on every
    change of a key under `prefix` that changes the value's `fingerprint`."""

    def __init__(
        self,
        client: EtcdClient,
        what: str,
        prefix: str,
        read: Callable[[EtcdClient], Awaitable[T]],
        on_change: Callable[[T], Awaitable[None] | None],
        fingerprint: Callable[[T], object] = lambda value: value,
    ) -> None:
        self._client = client
        self._what = what
        self._prefix = prefix
        self._read = read
        self._on_change = on_change
        self._fingerprint = fingerprint
        self._first = asyncio.Event()
        self._failures = 0
        self._last: object = _NOTHING
        self.task_name = f"{what}-watcher"

    async def wait_first(self, timeout: float | None = None) -> None:
        """Until the value has been delivered once; TimeoutError after `timeout`."""
        await asyncio.wait_for(self._first.wait(), timeout)

    async def _run(self) -> None:
        while True:
            try:
                await self._read_and_watch()
            except (EtcdError, ValueError) as e:
                level = log.warning if self._failures == 0 else log.debug
                level(f"{self._what}_watch_interrupted", error=str(e), compacted=isinstance(e, WatchCompacted))
            except Exception as e:
                log.exception(f"{self._what}_watcher_failed", error=repr(e))
            self._failures += 1
            await asyncio.sleep(min(_RETRY_CAP, _RETRY_FIRST * 2 ** (self._failures - 1)))

    async def _read_and_watch(self) -> None:
        _, revision = await self._client.get_prefixes([self._prefix])
        await self._deliver()
        self._failures = 0
        events = self._client.watch_prefix(self._prefix, revision + 1)
        async with contextlib.aclosing(events):
            async for _ in events:
                await self._deliver()
        raise EtcdUnavailable(f"the {self._what} watch ended")

    async def _deliver(self) -> None:
        value = await self._read(self._client)
        fingerprint = self._fingerprint(value)
        if fingerprint != self._last:
            self._last = fingerprint
            try:
                result = self._on_change(value)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                log.exception("on_change_failed", what=self._what, error=repr(e))
        self._first.set()


_NOTHING = object()
"""Before the first delivery: unlike any fingerprint."""
