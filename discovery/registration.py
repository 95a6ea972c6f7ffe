"""A bot instance's registration: the bot's definition (intents, phrases) under a key without a
lease, which outlives the instance until the bot is forgotten, and the instance record (address,
versions: no intents) under a lease kept alive, the instance's own or one shared by its process."""

from __future__ import annotations

import asyncio

from discovery.etcd_client import EtcdClient
from discovery.keys import definition_key, participant_key
from discovery.leases import LeasedKey, LeaseKeeper
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2

log = get_logger(__name__)

MAX_DEFINITION_BYTES = 1024 * 1024
"""Largest serialized definition: etcd refuses requests above 1.5 MiB by default (--max-request-bytes)."""
MAX_INSTANCE_BYTES = 4096
"""Largest serialized instance record: it holds an address and versions, never phrases."""


class DefinitionError(ValueError):
    """A bot definition or instance record that cannot be written to etcd (too large, or invalid)."""


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


def instance_of(participant: participant_pb2.Participant) -> participant_pb2.Participant:
    """The instance record: only what this instance adds to its bot's definition (the watcher joins
    the two; the intents stay in the definition, written once per bot)."""
    return participant_pb2.Participant(
        bot_id=participant.bot_id,
        group=participant.group,
        instance_id=participant.instance_id,
        address=participant.address,
        definition_version=participant.definition_version,
        software_version=participant.software_version,
    )


def instance_bytes(participant: participant_pb2.Participant) -> bytes:
    """The serialized instance record of `participant`; DefinitionError when it cannot be stored."""
    value = instance_of(participant).SerializeToString()
    if len(value) > MAX_INSTANCE_BYTES:
        raise DefinitionError(
            f"instance record of {participant.bot_id}@{participant.group}/{participant.instance_id} is {len(value)} "
            f"bytes serialized; the maximum is {MAX_INSTANCE_BYTES} (is the address or a version that long?)"
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
    """Keeps `participant` registered while this process runs and reaches etcd: its bot's
    definition under the definition key (no lease), and its instance record under its instance key,
    attached to a lease.

    The lease is the registration's own (`ttl` seconds, refreshed every ttl/3) unless `lease`, a
    LeaseKeeper shared by the process's registrations, is given (its TTL then applies): a killed
    process drops out within the TTL. When the lease is found gone (etcd was unreachable for longer
    than the TTL, or this process was frozen) a new lease is granted and the key put again.

    A key held by another lease (another instance started with the same instance id) is never
    overwritten: start() waits for that lease to run out (its holder died: at most the holder's
    TTL), then raises RegistrationConflict if it is still kept alive.
    """

    def __init__(
        self,
        client: EtcdClient,
        participant: participant_pb2.Participant,
        ttl: int = 10,
        *,
        lease: LeaseKeeper | None = None,
    ) -> None:
        if ttl < 1:
            raise ValueError(f"lease ttl must be at least 1 second, got {ttl}")
        self._client = client
        self._participant = _copy(participant)
        self._key = participant_key(participant.group, participant.bot_id, participant.instance_id)
        self._definition_key = definition_key(participant.group, participant.bot_id)
        self._definition = definition_bytes(participant)  # a bad registration fails here, before anything runs
        self._private = lease is None
        self._keeper = lease if lease is not None else LeaseKeeper(client, ttl, name=self._key)
        self._record = LeasedKey(self._keeper, self._key, instance_bytes(participant), before_put=self._write_definition)
        self._started = False
        self._lock = asyncio.Lock()

    @property
    def key(self) -> str:
        return self._key

    @property
    def definition_key(self) -> str:
        return self._definition_key

    @property
    def lease_id(self) -> int | None:
        """The lease that holds the instance key (None before start, after stop)."""
        return self._record.lease_id if self._started else None

    @property
    def registered(self) -> bool:
        """Whether the key was in etcd at the last successful contact (False before start, after stop)."""
        return self._started and self._record.registered

    @property
    def participant(self) -> participant_pb2.Participant:
        return _copy(self._participant)

    async def start(self) -> None:
        """Register and start the keep-alive; raises EtcdUnavailable if etcd cannot be reached."""
        if self._started:
            raise RuntimeError(f"registration {self._key} is already started")
        async with self._lock:
            await self._write_definition()
            try:
                await self._record.start(wait_for_holder=True)
            except BaseException:
                if self._private:
                    await self._keeper.stop()
                raise
            self._started = True
        log.info("registered", key=self._key, lease_id=self._keeper.lease_id, ttl=self._keeper.ttl, shared=not self._private)

    async def stop(self, forget: bool = False) -> None:
        """Deregister: the key disappears at once (its own lease revoked, or the key deleted from a
        shared lease).

        If etcd cannot be reached the key still disappears when the lease expires (a shared lease:
        when its keeper stops). The definition stays (the router keeps the bot's intents and
        answers that it is unavailable) unless `forget`: then it is deleted too, and the bot leaves
        its group for good (an error reaching etcd is raised then).
        """
        try:
            await self._stop()
        finally:
            if forget:
                await forget_definition(self._client, self._participant.group, self._participant.bot_id)
                log.info("definition_forgotten", key=self._definition_key)

    async def _stop(self) -> None:
        started, self._started = self._started, False
        await self._record.stop(delete=not self._private)
        if self._private:
            await self._keeper.stop()
        if started:
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
        record = instance_bytes(participant)
        self._participant = _copy(participant)
        self._definition = definition
        async with self._lock:
            await self._record.update(record)  # puts the definition first (before_put)
        log.info("registration_updated", key=self._key)

    async def _write_definition(self) -> None:
        """Put the definition (without a lease) unless etcd holds it already: an instance that
        restarts with the same definition changes nothing the router follows."""
        current = await self._client.get(self._definition_key)
        if current is None or current.value != self._definition:
            await self._client.put(self._definition_key, self._definition)
            log.info("definition_written", key=self._definition_key, bytes=len(self._definition))
