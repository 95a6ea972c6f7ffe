"""The store's domain logic over etcd.

etcd layout:
    /mbc/v1/context/namespaces/<namespace>                         → RegisterNamespaceRequest
    /mbc/v1/context/data/<namespace>/<scope>/<scope id>/<key>      → Struct {value, expires_at_unix_ms}
    /mbc/v1/conversations/<conversation id>/owner                  → Ownership
Scope ids are percent-encoded so any id fits in one key segment. A value's version is its etcd
mod revision; compare-and-set is an etcd transaction on it.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from context_store.leases import LeaseBuckets
from discovery import EtcdClient
from discovery.errors import LeaseNotFound
from mbc.runtime.config import StoreConfig  # noqa: F401  (re-exported: the settings live in mbc/runtime/config.py)
from mbc.runtime.logs import get_logger
from mbc.v1 import context_pb2

log = get_logger(__name__)

PREFIX = "/mbc/v1/context/"
NAMESPACES = PREFIX + "namespaces/"
DATA = PREFIX + "data/"
CONVERSATIONS = "/mbc/v1/conversations/"

_NAMESPACE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
MAX_SCOPE_ID = 256
# Ten years: a namespace TTL becomes an etcd lease TTL, and etcd refuses leases beyond ~285 years.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
_SCOPES = {
    context_pb2.SCOPE_GLOBAL: "global",
    context_pb2.SCOPE_CONSUMER: "consumer",
    context_pb2.SCOPE_CONVERSATION: "conversation",
}


class StoreError(Exception):
    """Base of the errors the service maps to status codes."""


class InvalidArgument(StoreError):
    pass


class NotFound(StoreError):
    pass


class VersionConflict(StoreError):
    pass


class LimitExceeded(StoreError):
    pass


class Fenced(StoreError):
    """A write fenced on a conversation's ownership version, which has moved on."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: struct_pb2.Value
    version: int
    expires_at_unix_ms: int


def _now_ms() -> int:
    return int(time.time() * 1000)


def check_namespace(namespace: str) -> None:
    if not _NAMESPACE.match(namespace):
        raise InvalidArgument(
            f"namespace {namespace!r} is invalid: use 1-64 letters, digits, '.', '_', '-', starting with a letter"
        )


def check_id(kind: str, value: str) -> None:
    if not value.strip():
        raise InvalidArgument(f"{kind} is required")
    if len(value) > MAX_SCOPE_ID:
        raise InvalidArgument(f"{kind} has {len(value)} characters; the maximum is {MAX_SCOPE_ID}")


def owner_key(conversation_id: str) -> str:
    check_id("conversation_id", conversation_id)
    return f"{CONVERSATIONS}{quote(conversation_id, safe='')}/owner"


class ContextStoreCore:
    def __init__(self, etcd: EtcdClient, config: StoreConfig = StoreConfig()) -> None:
        self.etcd = etcd
        self.config = config
        self.leases = LeaseBuckets(etcd, config.lease_bucket_seconds)
        self._namespaces: dict[str, tuple[int, float]] = {}

    async def register_namespace(self, namespace: str, ttl_seconds: int) -> int:
        check_namespace(namespace)
        if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
            raise InvalidArgument(f"ttl_seconds must be at least 1 and at most {MAX_TTL_SECONDS} (ten years), got {ttl_seconds}")
        spec = context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=ttl_seconds)
        await self.etcd.put(NAMESPACES + namespace, spec.SerializeToString())
        self._namespaces[namespace] = (ttl_seconds, time.monotonic())
        return ttl_seconds

    async def namespace_ttl(self, namespace: str) -> int:
        check_namespace(namespace)
        cached = self._namespaces.get(namespace)
        if cached and time.monotonic() - cached[1] < self.config.namespace_cache_seconds:
            return cached[0]
        kv = await self.etcd.get(NAMESPACES + namespace)
        if kv is None:
            self._namespaces.pop(namespace, None)
            raise NotFound(f"namespace {namespace!r} is not registered; call RegisterNamespace first")
        try:
            spec = context_pb2.RegisterNamespaceRequest.FromString(kv.value)
        except DecodeError:
            spec = context_pb2.RegisterNamespaceRequest()
        if not 1 <= spec.ttl_seconds <= MAX_TTL_SECONDS:
            log.warning("store_namespace_corrupt", namespace=namespace)
            raise NotFound(f"namespace {namespace!r} has a corrupt registration in etcd; call RegisterNamespace again")
        self._namespaces[namespace] = (spec.ttl_seconds, time.monotonic())
        return spec.ttl_seconds

    def _scope_prefix(self, namespace: str, scope: int, scope_id: str) -> str:
        name = _SCOPES.get(scope)
        if name is None:
            raise InvalidArgument("scope must be SCOPE_GLOBAL, SCOPE_CONSUMER or SCOPE_CONVERSATION")
        if scope == context_pb2.SCOPE_GLOBAL:
            if scope_id:
                raise InvalidArgument("scope_id must be empty for SCOPE_GLOBAL")
            scope_id = "_"
        else:
            check_id(f"scope_id (the {name} id)", scope_id)
        return f"{DATA}{namespace}/{name}/{quote(scope_id, safe='')}/"

    def _key(self, key: context_pb2.ContextKey) -> str:
        check_namespace(key.namespace)
        if not _KEY.match(key.key):
            raise InvalidArgument(
                f"key {key.key!r} is invalid: use 1-128 letters, digits, '.', '_', '-', starting with a letter"
            )
        return self._scope_prefix(key.namespace, key.scope, key.scope_id) + key.key

    @staticmethod
    def _decode(raw_key: str, raw: bytes, version: int) -> Entry | None:
        """The live entry stored under `raw_key`; None when it expired or is corrupt.

        A corrupt value (not written by this store) counts as absent, so a write replaces it
        rather than every read of the conversation failing until it expires."""
        try:
            stored = struct_pb2.Struct.FromString(raw)
        except DecodeError:
            stored = struct_pb2.Struct()
        value, expires = stored.fields.get("value"), stored.fields.get("expires_at_unix_ms")
        if value is None or value.WhichOneof("kind") is None or expires is None or not math.isfinite(expires.number_value):
            log.warning("store_value_corrupt", key=raw_key, version=version)
            return None
        if expires.number_value and expires.number_value <= _now_ms():
            return None
        return Entry(raw_key.rsplit("/", 1)[-1], value, version, int(expires.number_value))

    async def get(self, key: context_pb2.ContextKey) -> Entry | None:
        path = self._key(key)
        await self.namespace_ttl(key.namespace)
        kv = await self.etcd.get(path)
        return self._decode(kv.key, kv.value, kv.mod_revision) if kv else None

    async def set(self, key: context_pb2.ContextKey, value: struct_pb2.Value, expected_version: int | None,
                  owner_version: int | None = None) -> Entry:
        path = self._key(key)
        guard = self._fence(key, owner_version)
        ttl = await self.namespace_ttl(key.namespace)
        if value.WhichOneof("kind") is None:
            raise InvalidArgument("value is required (use null_value for null)")
        expires = _now_ms() + ttl * 1000
        payload = struct_pb2.Struct()
        payload.fields["value"].CopyFrom(value)
        payload.fields["expires_at_unix_ms"].number_value = expires
        raw = payload.SerializeToString()
        if len(raw) > self.config.max_value_bytes:
            raise InvalidArgument(f"value is {len(raw)} bytes serialized; the maximum is {self.config.max_value_bytes}")
        current = await self.etcd.get(path)
        live = current is not None and self._decode(current.key, current.value, current.mod_revision) is not None
        if expected_version is not None:
            actual = current.mod_revision if live else 0
            if actual != expected_version:
                raise VersionConflict(f"{key.key!r} is at version {actual}, not {expected_version}: read it again")
        if current is None:
            count = await self.etcd.count_prefix(f"{DATA}{key.namespace}/")
            if count >= self.config.max_keys_per_namespace:
                raise LimitExceeded(f"namespace {key.namespace!r} holds {count} keys; the maximum is {self.config.max_keys_per_namespace}")
        # The write is conditional on what was read, so a concurrent writer cannot be lost.
        ok, revision, now_current = await self._put_if(path, raw, current.mod_revision if current else 0, ttl, guard)
        if not ok:
            await self._check_fence(key, guard)
            if expected_version is not None:
                actual = now_current.mod_revision if now_current else 0
                raise VersionConflict(f"{key.key!r} changed concurrently (now version {actual}): read it again")
            return await self.set(key, value, None, owner_version)
        return Entry(key.key, value, revision, expires)

    async def _put_if(self, path: str, raw: bytes, mod_revision: int, ttl: int, guard: tuple[str, int] | None = None):
        lease = await self.leases.lease_for(ttl)
        try:
            return await self.etcd.put_if(path, raw, mod_revision, lease, guard)
        except LeaseNotFound:
            self.leases.forget(lease)
            return await self.etcd.put_if(path, raw, mod_revision, await self.leases.lease_for(ttl), guard)

    @staticmethod
    def _fence(key: context_pb2.ContextKey, owner_version: int | None) -> tuple[str, int] | None:
        """The etcd guard of a write fenced on the ownership version of the key's conversation."""
        if owner_version is None:
            return None
        if key.scope != context_pb2.SCOPE_CONVERSATION:
            raise InvalidArgument("owner_version fences writes of SCOPE_CONVERSATION only")
        if owner_version < 1:
            raise InvalidArgument(f"owner_version must be a version ClaimOwner returned (at least 1), got {owner_version}")
        return owner_key(key.scope_id), owner_version

    async def _check_fence(self, key: context_pb2.ContextKey, guard: tuple[str, int] | None) -> None:
        """Raise Fenced when the conversation's ownership record is no longer at the guard's version."""
        if guard is None:
            return
        ownership, version = await self.get_owner(key.scope_id)
        if version != guard[1]:
            holder = ownership.owner.bot_id if ownership else "nobody"
            raise Fenced(f"conversation {key.scope_id!r} is now owned by {holder!r} at version {version}; this write, "
                         f"made as its owner at version {guard[1]}, is refused (fenced)")

    async def delete(self, key: context_pb2.ContextKey, expected_version: int | None, owner_version: int | None = None) -> bool:
        path = self._key(key)
        guard = self._fence(key, owner_version)
        await self.namespace_ttl(key.namespace)
        await self._check_fence(key, guard)
        current = await self.etcd.get(path)
        live = current is not None and self._decode(current.key, current.value, current.mod_revision) is not None
        if expected_version is not None and (current.mod_revision if live else 0) != expected_version:
            raise VersionConflict(f"{key.key!r} is at version {current.mod_revision if live else 0}, not {expected_version}")
        if current is None:
            return False
        deleted = await self.etcd.delete_if(path, current.mod_revision, guard)
        if not deleted:
            await self._check_fence(key, guard)
        if not deleted and expected_version is not None:
            raise VersionConflict(f"{key.key!r} changed concurrently: read it again")
        return deleted and live

    async def list(self, namespace: str, scope: int, scope_id: str) -> list[Entry]:
        check_namespace(namespace)
        prefix = self._scope_prefix(namespace, scope, scope_id)
        await self.namespace_ttl(namespace)
        items, _ = await self.etcd.get_prefix(prefix)
        entries = (self._decode(kv.key, kv.value, kv.mod_revision) for kv in items)
        return sorted((e for e in entries if e is not None), key=lambda e: e.key)

    @staticmethod
    def _ownership(kv) -> context_pb2.Ownership | None:
        """The owner record in `kv`; None when there is none or it is corrupt (it then counts as
        absent: version 0, and a claim from version 0 replaces it)."""
        if kv is None:
            return None
        try:
            record = context_pb2.Ownership.FromString(kv.value)
        except DecodeError:
            record = context_pb2.Ownership()
        if not record.owner.bot_id:
            log.warning("store_owner_corrupt", key=kv.key, version=kv.mod_revision)
            return None
        return record

    async def get_owner(self, conversation_id: str) -> tuple[context_pb2.Ownership | None, int]:
        kv = await self.etcd.get(owner_key(conversation_id))
        record = self._ownership(kv)
        return (record, kv.mod_revision) if record is not None else (None, 0)

    async def claim_owner(self, conversation_id: str, ownership: context_pb2.Ownership, expected_version: int) -> int:
        path = owner_key(conversation_id)
        if not ownership.owner.bot_id:
            raise InvalidArgument("ownership.owner.bot_id is required")
        for name, text in (("ownership.owner.bot_id", ownership.owner.bot_id), ("ownership.owner.instance_id", ownership.owner.instance_id),
                           ("ownership.owner.address", ownership.owner.address), ("ownership.transfer_id", ownership.transfer_id)):
            if len(text) > MAX_SCOPE_ID:
                raise InvalidArgument(f"{name} has {len(text)} characters; the maximum is {MAX_SCOPE_ID}")
        record = context_pb2.Ownership()
        record.CopyFrom(ownership)
        record.updated_at_unix_ms = _now_ms()
        raw = record.SerializeToString()
        ttl = self.config.conversation_ttl_seconds
        ok, revision, current = await self._put_if(path, raw, expected_version, ttl)
        if not ok and expected_version == 0 and current is not None and self._ownership(current) is None:
            ok, revision, current = await self._put_if(path, raw, current.mod_revision, ttl)
        if not ok:
            holder_record = self._ownership(current)
            holder = holder_record.owner.bot_id if holder_record else "nobody"
            actual = current.mod_revision if holder_record else 0
            raise VersionConflict(
                f"conversation {conversation_id!r} is owned by {holder!r} at version {actual}, not {expected_version}"
            )
        return revision
