"""A bot instance's registration: its Participant under a lease that it keeps alive, and the bot's
definition under a key without a lease, which outlives the instance until the bot is forgotten."""

from __future__ import annotations

import asyncio
import contextlib

from discovery.errors import EtcdError, LeaseNotFound, RegistrationConflict
from discovery.etcd_client import EtcdClient
from discovery.keys import definition_key, participant_key
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2

log = get_logger(__name__)

_RETRY_FIRST = 0.2
_RETRY_CAP = 2.0
_MAX_HOLDER_WAIT = 60
"""Longest wait at start for another lease's key to expire, whatever that lease's TTL."""
MAX_DEFINITION_BYTES = 1024 * 1024
"""Largest serialized definition: etcd refuses requests above 1.5 MiB by default (--max-request-bytes)."""


class DefinitionError(ValueError):
    """A bot definition that cannot be written to etcd (too large, or not a valid definition)."""


def definition_of(participant: participant_pb2.Participant) -> participant_pb2.Participant:
    """The bot's definition: what every instance of the bot shares (no instance id, no address)."""
    return participant_pb2.Participant(
        bot_id=participant.bot_id,
        group=participant.group,
        collaboration=participant.collaboration,
        intents=participant.intents,
        definition_version=participant.definition_version,
        display_name=participant.display_name,
    )


def definition_bytes(participant: participant_pb2.Participant) -> bytes:
    """The serialized definition of `participant`'s bot; DefinitionError when it cannot be stored."""
    name = f"{participant.bot_id}@{participant.group}"
    try:
        definition_key(participant.group, participant.bot_id)
    except ValueError as e:
        raise DefinitionError(f"definition of {name}: {e}") from e
    value = definition_of(participant).SerializeToString()
    if len(value) > MAX_DEFINITION_BYTES:
        raise DefinitionError(
            f"definition of {name} is {len(value)} bytes serialized; the maximum is {MAX_DEFINITION_BYTES}"
            " (fewer or shorter phrases)"
        )
    return value


async def forget_definition(client: EtcdClient, group: str, bot_id: str) -> bool:
    """Delete a bot's definition: the router forgets the bot once no instance of it is live.
    Returns whether there was one."""
    return await client.delete(definition_key(group, bot_id))


def _copy(participant: participant_pb2.Participant) -> participant_pb2.Participant:
    copy = participant_pb2.Participant()
    copy.CopyFrom(participant)
    return copy


class Registration:
    """Keeps `participant` registered under its key while this process runs and reaches etcd.

    The key is attached to a lease of `ttl` seconds, refreshed every ttl/3, so a killed process
    drops out within `ttl`. When the lease is found gone (etcd was unreachable for longer than the
    TTL, or this process was frozen) a new lease is granted and the key put again.

    A key held by another lease (another instance started with the same instance id) is never
    overwritten: start() waits for that lease to run out (its holder died: at most the holder's
    TTL), then raises RegistrationConflict if it is still kept alive.
    """

    def __init__(self, client: EtcdClient, participant: participant_pb2.Participant, ttl: int = 10) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 second, got {ttl}")
        self._client = client
        self._participant = _copy(participant)
        self._key = participant_key(participant.group, participant.bot_id, participant.instance_id)
        self._definition_key = definition_key(participant.group, participant.bot_id)
        self._definition = definition_bytes(participant)  # a bad definition fails here, before anything runs
        self._ttl = ttl
        self._lease_id: int | None = None
        self._registered = False
        self._dirty = False
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._conflict_logged = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def definition_key(self) -> str:
        return self._definition_key

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def registered(self) -> bool:
        """Whether the key was in etcd at the last successful contact (False before start, after stop)."""
        return self._registered

    @property
    def participant(self) -> participant_pb2.Participant:
        return _copy(self._participant)

    async def start(self) -> None:
        """Register and start the keep-alive; raises EtcdUnavailable if etcd cannot be reached."""
        if self._task is not None:
            raise RuntimeError(f"registration {self._key} is already started")
        async with self._lock:
            await self._write_definition()
            await self._register(wait_for_holder=True)
        self._task = asyncio.create_task(self._keep_alive(), name=f"keep-alive {self._key}")
        log.info("registered", key=self._key, lease_id=self._lease_id, ttl=self._ttl)

    async def stop(self, forget: bool = False) -> None:
        """Stop the keep-alive and revoke the lease, so that the key disappears at once.

        If etcd cannot be reached the key still disappears when the lease expires. The definition
        stays (the router keeps the bot's intents and answers that it is unavailable) unless
        `forget`: then it is deleted too, and the bot leaves its group for good once no other
        instance of it is live (an error reaching etcd is raised then).
        """
        try:
            await self._stop()
        finally:
            if forget:
                await forget_definition(self._client, self._participant.group, self._participant.bot_id)
                log.info("definition_forgotten", key=self._definition_key)

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        lease_id, self._lease_id = self._lease_id, None
        self._registered = False
        if lease_id is None:
            return
        try:
            await self._client.revoke_lease(lease_id)
        except EtcdError as e:
            log.warning(
                "deregister_failed",
                key=self._key,
                lease_id=lease_id,
                error=str(e),
                note=f"the key expires with its lease within {self._ttl}s",
            )
        else:
            log.info("deregistered", key=self._key)

    async def update(self, participant: participant_pb2.Participant) -> None:
        """Replace the registered content (same group, bot_id and instance_id) under the same lease.

        If etcd cannot be reached this raises EtcdUnavailable, and the keep-alive puts the new
        content once etcd answers again.
        """
        key = participant_key(participant.group, participant.bot_id, participant.instance_id)
        if key != self._key:
            raise ValueError(f"update cannot move {self._key} to {key}: use a new Registration")
        definition = definition_bytes(participant)
        self._participant = _copy(participant)
        self._definition = definition
        self._dirty = True
        if self._task is None:
            return
        async with self._lock:
            await self._write_definition()
            if self._lease_id is None:
                return
            try:
                await self._put(self._lease_id)
            except LeaseNotFound:
                await self._renew()
        log.info("registration_updated", key=self._key)

    async def _write_definition(self) -> None:
        """Put the definition (without a lease) unless etcd holds it already: an instance that
        restarts with the same definition changes nothing the router follows."""
        current = await self._client.get(self._definition_key)
        if current is None or current.value != self._definition:
            await self._client.put(self._definition_key, self._definition)
            log.info("definition_written", key=self._definition_key, bytes=len(self._definition))

    async def _register(self, wait_for_holder: bool = False) -> None:
        lease_id = await self._client.grant_lease(self._ttl)
        try:
            await self._claim(lease_id, wait_for_holder)
        except BaseException:
            with contextlib.suppress(EtcdError):
                await self._client.revoke_lease(lease_id)
            raise
        self._lease_id = lease_id
        self._registered = True
        self._dirty = False

    async def _claim(self, lease_id: int, wait_for_holder: bool = False) -> None:
        """Put the participant under `lease_id` unless another lease holds the key.

        With `wait_for_holder`, a holder whose lease runs out (a dead process) is waited for, for at
        most that lease's granted TTL plus a second (capped at _MAX_HOLDER_WAIT), this lease being
        kept alive meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = None
        while True:
            holder = await self._client.put_unless_held(self._key, self._participant.SerializeToString(), lease_id)
            if holder is None:
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
            await self._client.refresh_lease(lease_id)

    async def _put(self, lease_id: int) -> None:
        await self._claim(lease_id)
        self._dirty = False

    async def _renew(self) -> None:
        self._lease_id = None
        self._registered = False
        await self._register()
        log.info("registration_renewed", key=self._key, lease_id=self._lease_id)

    async def _refresh(self) -> None:
        if self._lease_id is None:
            await self._renew()
            return
        if await self._client.refresh_lease(self._lease_id) <= 0:
            log.warning("registration_lease_lost", key=self._key, lease_id=self._lease_id)
            await self._renew()
            return
        self._registered = True
        if self._dirty:
            try:
                await self._put(self._lease_id)
            except LeaseNotFound:
                await self._renew()

    async def _keep_alive(self) -> None:
        interval = self._ttl / 3
        delay = interval
        failures = 0
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    await self._refresh()
            except Exception as e:
                # Never give up: etcd may come back, and then the registration must too.
                failures += 1
                delay = min(interval, _RETRY_CAP, _RETRY_FIRST * 2 ** (failures - 1))
                level = log.warning if failures == 1 else log.debug
                level(
                    "registration_keepalive_failed",
                    key=self._key,
                    error=str(e) or type(e).__name__,
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                continue
            if failures:
                log.info("registration_keepalive_recovered", key=self._key, failed_attempts=failures)
            failures = 0
            delay = interval
