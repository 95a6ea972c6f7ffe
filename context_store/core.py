"""The store's domain logic over etcd.

etcd layout:
    /mbc/v1/context/namespaces/<namespace>                         → RegisterNamespaceRequest
    /mbc/v1/context/data/<namespace>/<scope>/<scope id>/<key>      → Struct {value, expires_at_unix_ms}
    /mbc/v1/conversations/<conversation id>/owner                  → Ownership
    /mbc/v1/context/counts/<namespace>/<shard>                     → the namespace's keys counted (decimal)
    /mbc/v1/context/counts/<namespace>/recounted                   → when they were last counted in etcd (ms)
Scope ids are percent-encoded so any id fits in one key segment. A value's version is its etcd
mod revision; compare-and-set is an etcd transaction on it.

A namespace's keys are counted in its counter shards (their sum), changed in the very
transaction that creates or deletes a key, compared on the shard's mod revision: a write costs
a read of the few counter keys, not a count of the namespace's keys, and concurrent writers on
any number of store replicas each count once. Keys that expire are dropped by etcd (their
shared lease) without a transaction, so the counter can only overstate: when it reaches the
limit, the store counts the namespace's keys in etcd and stores that count (at most once per
lease bucket: expiry frees room at that granularity anyway).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from context_store.leases import LeaseBuckets
from discovery import EtcdClient, KeyValue
from discovery.errors import LeaseNotFound
from discovery.etcd_client import compare_mod, delete_op, put_op, range_op
from mbc.runtime.config import StoreConfig  # noqa: F401  (re-exported: the settings live in mbc/runtime/config.py)
from mbc.runtime.logs import get_logger
from mbc.v1 import context_pb2

log = get_logger(__name__)

PREFIX = "/mbc/v1/context/"
NAMESPACES = PREFIX + "namespaces/"
DATA = PREFIX + "data/"
COUNTS = PREFIX + "counts/"
COUNT_SHARDS = 8
"""Counter keys per namespace: concurrent creations rarely compare on the same one."""
_RECOUNTED = "recounted"
CONVERSATIONS = "/mbc/v1/conversations/"

_NAMESPACE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
MAX_SCOPE_ID = 256
# Ten years: a namespace TTL becomes an etcd lease TTL, and etcd refuses leases beyond ~285 years.
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
_SCOPES: dict[int, str] = {
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
class _Count:
    """A namespace's counter as read: its shards (by etcd key) and the last recount."""

    shards: dict[str, KeyValue]
    recounted: KeyValue | None
    total: int | None
    """The sum of the shards; None when the namespace was never counted (or a shard is corrupt)."""

    def recount_due(self, bucket_seconds: int) -> bool:
        if self.total is None or self.recounted is None:
            return True
        try:
            last = int(self.recounted.value)
        except ValueError:
            return True
        return _now_ms() - last >= bucket_seconds * 1000


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
            raise InvalidArgument(f"key {key.key!r} is invalid: use 1-128 letters, digits, '.', '_', '-', starting with a letter")
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

    async def set(
        self, key: context_pb2.ContextKey, value: struct_pb2.Value, expected_version: int | None, owner_version: int | None = None
    ) -> Entry:
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
            actual = current.mod_revision if current is not None and live else 0
            if actual != expected_version:
                raise VersionConflict(f"{key.key!r} is at version {actual}, not {expected_version}: read it again")
        # The write is conditional on what was read, so a concurrent writer cannot be lost.
        if current is None:
            ok, revision, now_current = await self._create(key.namespace, path, raw, ttl, guard)
        else:
            ok, revision, now_current = await self._put_if(path, raw, current.mod_revision, ttl, guard)
        if not ok:
            await self._check_fence(key, guard)
            if expected_version is not None:
                actual = now_current.mod_revision if now_current else 0
                raise VersionConflict(f"{key.key!r} changed concurrently (now version {actual}): read it again")
            return await self.set(key, value, None, owner_version)
        return Entry(key.key, value, revision, expires)

    async def _read_count(self, namespace: str) -> _Count:
        """The namespace's counter: one read of at most COUNT_SHARDS + 1 small keys."""
        prefix = f"{COUNTS}{namespace}/"
        items, _ = await self.etcd.get_prefix(prefix)
        shards: dict[str, KeyValue] = {}
        recounted: KeyValue | None = None
        total, corrupt = 0, False
        for kv in items:
            if kv.key == prefix + _RECOUNTED:
                recounted = kv
                continue
            shards[kv.key] = kv
            try:
                total += int(kv.value)
            except ValueError:
                log.warning("store_count_corrupt", key=kv.key)
                corrupt = True
                break
        return _Count(shards, recounted, total if recounted is not None and not corrupt else None)

    async def key_count(self, namespace: str) -> int | None:
        """The namespace's keys as counted (expired keys etcd dropped since the last recount included);
        None before its first write."""
        return (await self._read_count(namespace)).total

    async def _recount(self, namespace: str, seen: _Count) -> bool:
        """Count the namespace's keys in etcd (O(keys)) and store that count in place of `seen`,
        unless a write changed the counter since it was read (False: read it again). A write
        between the count and the store changes a shard's mod revision, so the stored count is
        never off by a write; expiry meanwhile only leaves it high."""
        count = await self.etcd.count_prefix(f"{DATA}{namespace}/")
        prefix = f"{COUNTS}{namespace}/"
        shards = sorted({f"{prefix}{i}" for i in range(COUNT_SHARDS)} | seen.shards.keys())
        marker = prefix + _RECOUNTED
        stored = (
            await self.etcd.txn(
                compare=[compare_mod(k, seen.shards[k].mod_revision if k in seen.shards else 0) for k in shards]
                + [compare_mod(marker, seen.recounted.mod_revision if seen.recounted else 0)],
                success=[put_op(k, str(count if i == 0 else 0).encode()) for i, k in enumerate(shards)]
                + [put_op(marker, str(_now_ms()).encode())],
            )
        ).succeeded
        log.info("store_keys_counted", namespace=namespace, keys=count, stored=stored)
        return stored

    async def _counted(
        self, namespace: str, path: str, mod_revision: int, raw: bytes | None, lease: int, guard: tuple[str, int] | None
    ):
        """Create (`raw`; `path` absent: mod_revision 0) or delete (`raw` None) `path`, and count it
        in the same transaction: ±1 on a counter shard, compared on its mod revision. Returns
        (succeeded, store revision, `path` as it is when the transaction failed on it or on the
        guard); a counter changed concurrently is read again and the transaction retried."""
        limit = self.config.max_keys_per_namespace
        recounted = False
        while True:
            count = await self._read_count(namespace)
            # Counted once per call at most (a namespace never counted: until counted): the count
            # costs O(keys), and a counter that moved since was moved by exact ±1 transactions.
            if count.total is None or (
                raw is not None and count.total >= limit and not recounted and count.recount_due(self.config.lease_bucket_seconds)
            ):
                recounted = True
                await self._recount(namespace, count)
                continue
            if raw is not None and count.total >= limit:
                raise LimitExceeded(f"namespace {namespace!r} holds {count.total} keys; the maximum is {limit}")
            shards = [f"{COUNTS}{namespace}/{i}" for i in range(COUNT_SHARDS)]
            if raw is None:  # a delete takes from a shard that has something, when one has
                shards = [k for k in shards if k in count.shards and int(count.shards[k].value) > 0] or shards
            shard = random.choice(shards)
            kv = count.shards.get(shard)
            value = (int(kv.value) if kv else 0) + (1 if raw is not None else -1)
            write = put_op(path, raw, lease) if raw is not None else delete_op(path)
            result = await self.etcd.txn(
                compare=[compare_mod(path, mod_revision), compare_mod(shard, kv.mod_revision if kv else 0)]
                + ([compare_mod(*guard)] if guard else []),
                success=[write, put_op(shard, str(value).encode())],
                failure=[range_op(path)] + ([range_op(guard[0])] if guard else []),
            )
            if result.succeeded:
                return True, result.revision, None
            now = result.reads[0]
            fence = result.reads[1] if guard else None
            if (now.mod_revision if now else 0) != mod_revision or (guard and (fence.mod_revision if fence else 0) != guard[1]):
                return False, result.revision, now
            # Only the counter shard moved (another creation or deletion): read it again.

    async def _create(self, namespace: str, path: str, raw: bytes, ttl: int, guard: tuple[str, int] | None = None):
        """Put `path` only if absent, counted, refused past the namespace's key limit (LimitExceeded)."""
        lease = await self.leases.lease_for(ttl)
        try:
            return await self._counted(namespace, path, 0, raw, lease, guard)
        except LeaseNotFound:
            self.leases.forget(lease)
            return await self._counted(namespace, path, 0, raw, await self.leases.lease_for(ttl), guard)

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
            raise Fenced(
                f"conversation {key.scope_id!r} is now owned by {holder!r} at version {version}; this write, "
                f"made as its owner at version {guard[1]}, is refused (fenced)"
            )

    async def delete(self, key: context_pb2.ContextKey, expected_version: int | None, owner_version: int | None = None) -> bool:
        path = self._key(key)
        guard = self._fence(key, owner_version)
        await self.namespace_ttl(key.namespace)
        await self._check_fence(key, guard)
        current = await self.etcd.get(path)
        live = current is not None and self._decode(current.key, current.value, current.mod_revision) is not None
        version = current.mod_revision if current is not None and live else 0
        if expected_version is not None and version != expected_version:
            raise VersionConflict(f"{key.key!r} is at version {version}, not {expected_version}")
        if current is None:
            return False
        deleted, _, _ = await self._counted(key.namespace, path, current.mod_revision, None, 0, guard)
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
    def _ownership(kv: KeyValue | None) -> context_pb2.Ownership | None:
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
        if kv is None or record is None:
            return None, 0
        return record, kv.mod_revision

    async def claim_owner(self, conversation_id: str, ownership: context_pb2.Ownership, expected_version: int) -> int:
        path = owner_key(conversation_id)
        if not ownership.owner.bot_id:
            raise InvalidArgument("ownership.owner.bot_id is required")
        for name, text in (
            ("ownership.owner.bot_id", ownership.owner.bot_id),
            ("ownership.owner.instance_id", ownership.owner.instance_id),
            ("ownership.owner.address", ownership.owner.address),
            ("ownership.owner.group", ownership.owner.group),
            ("ownership.transfer_id", ownership.transfer_id),
        ):
            if len(text) > MAX_SCOPE_ID:
                raise InvalidArgument(f"{name} has {len(text)} characters; the maximum is {MAX_SCOPE_ID}")
        if ownership.HasField("transfer_response") and not ownership.transfer_id:
            raise InvalidArgument("ownership.transfer_response needs the transfer_id it answers")
        size = ownership.transfer_response.ByteSize()
        if size > self.config.max_value_bytes:
            raise InvalidArgument(
                f"ownership.transfer_response is {size} bytes serialized; the maximum is {self.config.max_value_bytes}"
            )
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
