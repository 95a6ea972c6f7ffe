"""One etcd lease kept alive for many keys of a process (`LeaseKeeper`), and a key kept under it
that never overwrites a key another lease holds (`LeasedKey`).

A host that runs hundreds of bots keeps one lease for all their instance keys, and a router can
keep its own record under one too: one keep-alive per ttl/3 for the process, over the client's
one keep-alive stream, instead of one per key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from discovery.errors import EtcdError, LeaseNotFound, RegistrationConflict
from discovery.etcd_client import EtcdClient
from mbc.runtime.logs import get_logger

log = get_logger(__name__)

_RETRY_FIRST = 0.2
_RETRY_CAP = 2.0
_MAX_HOLDER_WAIT = 60
"""Longest wait at start for another lease's key to expire, whatever that lease's TTL."""


class LeaseKeeper:
    """An etcd lease of `ttl` seconds, refreshed every ttl/3 while the keeper runs, for every
    LeasedKey attached to it.

    When the lease is found gone (etcd unreachable for longer than the TTL, the process frozen) a
    new lease is granted and every attached key is put again. A killed process loses all its keys
    within `ttl`; stop() revokes the lease, which deletes them at once.
    """

    def __init__(self, client: EtcdClient, ttl: int = 10, name: str = "lease") -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 second, got {ttl}")
        self._client = client
        self._ttl = ttl
        self._name = name
        self._lease_id: int | None = None
        self._keys: dict[str, LeasedKey] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def ttl(self) -> int:
        return self._ttl

    @property
    def lease_id(self) -> int | None:
        """The lease now (None before start, after stop, and while a lost lease is replaced)."""
        return self._lease_id

    @property
    def keys(self) -> list[str]:
        """The keys attached now."""
        return list(self._keys)

    async def start(self) -> int:
        """Grant the lease (once) and start keeping it alive; return its id. EtcdUnavailable if
        etcd cannot be reached (start() can be called again)."""
        lease_id = self._lease_id or await self.renew(None)
        if self._task is None:
            self._task = asyncio.create_task(self._keep_alive(), name=f"keep-alive {self._name}")
        return lease_id

    async def stop(self) -> None:
        """Stop the keep-alive and revoke the lease: every attached key disappears at once (or
        within the TTL when etcd cannot be reached)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is None:
            return
        try:
            await self._client.revoke_lease(lease_id)
        except EtcdError as e:
            log.warning(
                "lease_revoke_failed",
                lease=self._name,
                lease_id=lease_id,
                keys=len(self._keys),
                error=str(e),
                note=f"its keys expire with it within {self._ttl}s",
            )

    def abandon(self) -> None:
        """Stop refreshing without revoking, as a killed process does: the keys expire with the
        lease within the TTL."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def renew(self, stale: int | None) -> int:
        """The lease to use instead of `stale` (found gone): a new one, granted once however many
        keys found it gone."""
        async with self._lock:
            if self._lease_id is not None and self._lease_id != stale:
                return self._lease_id
            self._lease_id = None
            self._lease_id = await self._client.grant_lease(self._ttl)
            if stale is not None:
                log.info("lease_renewed", lease=self._name, lease_id=self._lease_id, keys=len(self._keys))
            return self._lease_id

    def attach(self, key: LeasedKey) -> None:
        self._keys[key.key] = key

    def detach(self, key: LeasedKey) -> None:
        if self._keys.get(key.key) is key:
            del self._keys[key.key]

    async def _tick(self) -> bool:
        """Refresh the lease (or replace it) and put the keys that need it; whether all are in etcd."""
        lease_id = self._lease_id
        if lease_id is None or await self._client.refresh_lease(lease_id) <= 0:
            if lease_id is not None:
                log.warning("lease_lost", lease=self._name, lease_id=lease_id, keys=len(self._keys))
            lease_id = await self.renew(lease_id)
        keys = [k for k in self._keys.values() if k.needs_put(lease_id)]
        results = await asyncio.gather(*(k.sync(lease_id) for k in keys), return_exceptions=True)
        failed = [(k, r) for k, r in zip(keys, results) if isinstance(r, BaseException)]
        for key, error in failed[:3]:
            log.warning("leased_key_put_failed", key=key.key, error=str(error) or type(error).__name__)
        return not failed

    async def _keep_alive(self) -> None:
        interval = self._ttl / 3
        delay = interval
        failures = 0
        while True:
            await asyncio.sleep(delay)
            try:
                done = await self._tick()
            except Exception as e:
                # Never give up: etcd may come back, and then every key must too.
                done = False
                level = log.warning if failures == 0 else log.debug
                level("lease_keepalive_failed", lease=self._name, error=str(e) or type(e).__name__, attempt=failures + 1)
            if done:
                if failures:
                    log.info("lease_keepalive_recovered", lease=self._name, failed_attempts=failures)
                failures = 0
                delay = interval
            else:
                failures += 1
                delay = min(interval, _RETRY_CAP, _RETRY_FIRST * 2 ** (failures - 1))


class LeasedKey:
    """`key` = `value` under `keeper`'s lease while started; put again when the lease is replaced
    or the value changed while etcd was away. A key held by another lease (another instance with
    the same identity) is never overwritten: start() waits for that lease to run out (its holder
    died: at most the holder's TTL), then raises RegistrationConflict if it is still kept alive.

    `before_put`, when given, runs before every put after the first (a lease replaced, a value
    updated): what the key depends on (a bot's definition) is put again first.
    """

    def __init__(
        self, keeper: LeaseKeeper, key: str, value: bytes, before_put: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self._keeper = keeper
        self._client = keeper.client
        self._key = key
        self._value = value
        self._before_put = before_put
        self._put_lease: int | None = None
        self._dirty = False
        self._started = False
        self._lock = asyncio.Lock()
        self._conflict_logged = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def value(self) -> bytes:
        return self._value

    @property
    def lease_id(self) -> int | None:
        """The lease the key was last put under."""
        return self._put_lease

    @property
    def registered(self) -> bool:
        """Whether the key was put under the keeper's current lease with the current value."""
        return self._started and not self._dirty and self._put_lease is not None and self._put_lease == self._keeper.lease_id

    def needs_put(self, lease_id: int) -> bool:
        return self._started and (self._dirty or self._put_lease != lease_id)

    async def start(self, wait_for_holder: bool = True) -> None:
        """Put the key under the keeper's lease (the keeper is started here if it is not yet)."""
        if self._started:
            raise RuntimeError(f"{self._key} is already started")
        async with self._lock:
            lease_id = await self._keeper.start()
            await self._claim(lease_id, wait_for_holder)
            self._started = True
            self._keeper.attach(self)

    async def update(self, value: bytes) -> None:
        """Put a new value under the same lease. If etcd cannot be reached this raises
        EtcdUnavailable, and the keeper puts the new value once etcd answers again."""
        self._value = value
        self._dirty = True
        if not self._started:
            return
        lease_id = self._keeper.lease_id
        if lease_id is not None:
            await self.sync(lease_id)

    async def stop(self, delete: bool = True) -> None:
        """Detach from the keeper and, with `delete`, delete the key if this lease still holds it
        (without: it goes with the lease)."""
        self._keeper.detach(self)
        started, self._started = self._started, False
        lease_id, self._put_lease = self._put_lease, None
        if started and delete and lease_id is not None:
            try:
                await self._client.delete_if_leased(self._key, lease_id)
            except EtcdError as e:
                log.warning("leased_key_delete_failed", key=self._key, error=str(e), note="it expires with its lease")

    async def sync(self, lease_id: int) -> None:
        """Put the key under `lease_id` (a lease gone meanwhile is replaced through the keeper)."""
        async with self._lock:
            if not self._started or not self.needs_put(lease_id):
                return
            if self._before_put is not None:
                await self._before_put()
            dirty_value, previous = self._value, self._put_lease
            try:
                await self._claim(lease_id)
            except LeaseNotFound:
                lease_id = await self._keeper.renew(lease_id)
                await self._claim(lease_id)
            if self._value is dirty_value:
                self._dirty = False
            if previous != self._put_lease:
                log.info("registration_renewed", key=self._key, lease_id=self._put_lease)

    async def _claim(self, lease_id: int, wait_for_holder: bool = False) -> None:
        """Put the value under `lease_id` unless another lease holds the key.

        With `wait_for_holder`, a holder whose lease runs out (a dead process) is waited for, for at
        most that lease's granted TTL plus a second (capped at _MAX_HOLDER_WAIT), the keeper keeping
        this lease alive meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            current = self._keeper.lease_id or lease_id
            holder = await self._client.put_unless_held(self._key, self._value, current)
            if holder is None:
                self._put_lease = current
                self._conflict_logged = False
                return
            if deadline is None:
                granted = (await self._client.lease_ttl(holder.lease))[1] if holder.lease and wait_for_holder else -1
                granted = min(granted, _MAX_HOLDER_WAIT)
                deadline = loop.time() + granted + 1
                if granted > 0:
                    log.warning(
                        "registration_waiting_for_holder",
                        key=self._key,
                        holder_lease=f"{holder.lease:x}",
                        note=f"another lease holds the key: waiting up to {granted + 1}s for it to expire",
                    )
            if loop.time() >= deadline:
                error = RegistrationConflict(self._key, holder.lease)
                if not self._conflict_logged:
                    log.error("registration_conflict", key=self._key, holder_lease=f"{holder.lease:x}", error=str(error))
                    self._conflict_logged = True
                raise error
            await asyncio.sleep(0.5)
