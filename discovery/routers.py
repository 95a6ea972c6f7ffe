"""Router replicas in etcd: each router keeps a small record (its address and version) under
/mbc/v1/routers/<router_id> on a lease (`RouterRegistration`), and bots follow that prefix
(`RouterWatcher`) to dial every live replica (mbc/runtime/channels.py balances over them).

A replica registers as soon as it listens, while it may still be warming up: its gRPC health
status (NOT_SERVING until its index is ready) keeps balanced clients off it until then, and
connecting early lets them use it the moment it turns SERVING. A killed replica's record vanishes
when its lease runs out; one stopped cleanly revokes the lease, so its record goes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from discovery.background import BackgroundLoop
from discovery.errors import EtcdUnavailable, WatchCompacted
from discovery.etcd_client import EtcdClient, KeyValue
from discovery.keys import ROUTERS_PREFIX, parse_router_key, router_key
from discovery.leases import LeasedKey, LeaseKeeper
from mbc.runtime.logs import get_logger

log = get_logger(__name__)

_RETRY_FIRST = 0.2
_RETRY_CAP = 2.0


@dataclass(frozen=True)
class RouterRecord:
    """What a router replica publishes about itself."""

    router_id: str
    address: str
    """host:port its Router service listens on (what bots dial)."""
    version: str = ""
    """Its mbc version."""

    @property
    def key(self) -> str:
        return router_key(self.router_id)

    def to_bytes(self) -> bytes:
        return json.dumps({"address": self.address, "version": self.version}, sort_keys=True).encode()

    @classmethod
    def parse(cls, key: str, value: bytes) -> RouterRecord:
        """The record stored under `key`; ValueError saying why when it is not one."""
        router_id = parse_router_key(key)
        try:
            data = json.loads(value)
        except ValueError:
            raise ValueError(f"{key}: value is not JSON") from None
        address = data.get("address") if isinstance(data, dict) else None
        if not isinstance(address, str) or ":" not in address:
            raise ValueError(f"{key}: no address host:port in {value[:200]!r}")
        version = data.get("version", "")
        return cls(router_id, address, version if isinstance(version, str) else "")


def parse_records(items: list[KeyValue]) -> dict[str, RouterRecord]:
    """The valid records among `items`, by key (each invalid one logged)."""
    records = {}
    for kv in items:
        try:
            records[kv.key] = RouterRecord.parse(kv.key, kv.value)
        except ValueError as e:
            log.warning("invalid_router_record", key=kv.key, reason=str(e))
    return records


async def list_routers(client: EtcdClient) -> list[RouterRecord]:
    """The router replicas registered now, by router id."""
    items, _ = await client.get_prefix(ROUTERS_PREFIX)
    return sorted(parse_records(items).values(), key=lambda r: r.router_id)


class RouterRegistration:
    """Keeps `record` under its key on a lease of `ttl` seconds (a `LeaseKeeper` of its own: a lost
    lease is replaced and the record put again) while this process runs and reaches etcd."""

    def __init__(self, client: EtcdClient, record: RouterRecord, ttl: int = 10) -> None:
        self.record = record
        self._keeper = LeaseKeeper(client, ttl, name="router")
        self._key = LeasedKey(self._keeper, record.key, record.to_bytes())

    async def start(self) -> None:
        """Put the record; raises an EtcdError when etcd refuses or cannot be reached."""
        await self._key.start()
        log.info("router_registered", key=self.record.key, address=self.record.address, ttl=self._keeper.ttl)

    async def stop(self) -> None:
        """Delete the record and revoke the lease (when etcd cannot be reached, the record goes with
        the lease)."""
        await self._key.stop()
        await self._keeper.stop()
        log.info("router_deregistered", key=self.record.key)


class RouterWatcher(BackgroundLoop):
    """Calls `on_change` with the sorted addresses of the registered replicas after the first list
    and whenever they change. On a broken or compacted watch it keeps the last addresses (the
    replicas are likely still there), lists again and resumes; it stops only with stop()."""

    task_name = "router-watcher"

    def __init__(self, client: EtcdClient, on_change: Callable[[tuple[str, ...]], None]) -> None:
        self._client = client
        self._on_change = on_change
        self._records: dict[str, RouterRecord] = {}
        self._addresses: tuple[str, ...] | None = None
        self._ready = asyncio.Event()

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses last published (empty before the first list)."""
        return self._addresses or ()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the first list was published; TimeoutError after `timeout` seconds."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                items, revision = await self._client.get_prefix(ROUTERS_PREFIX)
                self._records = parse_records(items)
                self._publish()
                failures = 0
                async with contextlib.aclosing(self._client.watch_prefix(ROUTERS_PREFIX, revision + 1)) as events:
                    async for event in events:
                        if event.kind == "delete":
                            self._records.pop(event.key, None)
                        else:
                            self._records.pop(event.key, None)
                            self._records.update(parse_records([KeyValue(event.key, event.value, event.mod_revision, 0)]))
                        self._publish()
                raise EtcdUnavailable("the watch ended")
            except (EtcdUnavailable, WatchCompacted) as e:
                (log.warning if failures == 0 else log.debug)("router_watch_interrupted", error=str(e), attempt=failures + 1)
            except Exception as e:
                log.exception("router_watcher_failed", error=repr(e))
            failures += 1
            await asyncio.sleep(min(_RETRY_CAP, _RETRY_FIRST * 2 ** (failures - 1)))

    def _publish(self) -> None:
        addresses = tuple(sorted({r.address for r in self._records.values()}))
        if addresses != self._addresses:
            self._addresses = addresses
            log.info("routers_changed", addresses=list(addresses))
            try:
                self._on_change(addresses)
            except Exception as e:
                log.exception("on_routers_change_failed", error=repr(e))
        self._ready.set()
