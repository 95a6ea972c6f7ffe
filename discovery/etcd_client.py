"""A small asyncio etcd v3 client: the only module of the project that imports aetcd.

aetcd (pinned, unmaintained) does the unary requests. Watches use its generated gRPC stubs
directly: aetcd's own watch drops the response headers and progress responses, and it waits
forever when etcd stops answering without closing the connection (a frozen process, a network
partition). Here an idle watch sends a progress request every `heartbeat` seconds and raises
EtcdUnavailable if etcd does not answer within `timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc
from aetcd import rpc

from discovery.errors import EtcdError, EtcdUnavailable, LeaseNotFound, WatchCompacted
from mbc.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    # gRPC's reconnect backoff otherwise grows to two minutes while etcd is down, and calls fail
    # at once during the backoff even after etcd is back.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}

# Status codes that mean "the connection or the server is not usable right now".
_TRANSIENT = frozenset({
    rpc.StatusCode.UNAVAILABLE,
    rpc.StatusCode.DEADLINE_EXCEEDED,
    rpc.StatusCode.CANCELLED,
    rpc.StatusCode.UNKNOWN,
    rpc.StatusCode.ABORTED,
    rpc.StatusCode.INTERNAL,
})


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint.strip()
    if text.startswith("https://"):
        raise ValueError(f"etcd endpoint {endpoint!r}: TLS is not supported")
    text = text.removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host, int(port)


def _decode(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def _rpc_error(error: rpc.AioRpcError) -> EtcdError:
    details = error.details() or error.code().name
    if error.code() in _TRANSIENT:
        return EtcdUnavailable(details)
    if "lease not found" in details:
        return LeaseNotFound(details)
    return EtcdError(details)


def _translate(error: aetcd.exceptions.ClientError) -> EtcdError:
    if isinstance(error, aetcd.exceptions.RevisionCompactedError):
        return WatchCompacted(error.compacted_revision)
    if isinstance(error.__cause__, rpc.AioRpcError):
        return _rpc_error(error.__cause__)
    message = str(error) or type(error).__name__
    if isinstance(error, (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError,
                          aetcd.exceptions.WatchTimeoutError)):
        return EtcdUnavailable(message)
    return EtcdError(message)


class EtcdClient:
    """Connection to an etcd cluster given as "host:port" endpoints.

    Each request goes to the current endpoint; when that one cannot be reached the request is
    tried on the next ones, and the first that answers becomes current. `timeout` bounds every
    request. Errors are those of discovery.errors.
    """

    def __init__(self, endpoints: list[str] | str, timeout: float = 5.0, *, heartbeat: float = 2.0) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e.strip()]
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if timeout <= 0 or heartbeat <= 0:
            raise ValueError("timeout and heartbeat must be positive")
        self._endpoints = [_parse_endpoint(e) for e in endpoints]
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._clients: dict[int, aetcd.Client] = {}
        self._current = 0
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return [self._name(i) for i in range(len(self._endpoints))]

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self._name(self._current)

    @property
    def timeout(self) -> float:
        return self._timeout

    async def connect(self) -> None:
        """Check that some endpoint answers; raise EtcdUnavailable if none does.

        Requests reconnect by themselves, so a failed connect() can be retried or ignored.
        """
        self._closed = False
        await self._unary("connect", lambda c: c.get(b"/"))

    async def close(self) -> None:
        """Close the connections; running watches end with EtcdUnavailable."""
        self._closed = True
        clients, self._clients = self._clients, {}
        for client in clients.values():
            try:
                await client.close()
            except Exception as e:
                log.debug("etcd_close_failed", error=repr(e))

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> int:
        """Store `value` under `key` (attached to the lease, if given); return the new store revision."""
        response = await self._unary("put", lambda c: c.put(key.encode(), value, lease=lease_id or 0))
        return response.header.revision

    async def get(self, key: str) -> KeyValue | None:
        result = await self._unary("get", lambda c: c.get(key.encode()))
        if result is None:
            return None
        return KeyValue(_decode(result.key), result.value, result.mod_revision, result.lease)

    async def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Return the keys under `prefix` and the store revision of the read (watch from it + 1)."""
        result = await self._unary("get_prefix", lambda c: c.get_prefix(prefix.encode()))
        items = [KeyValue(_decode(kv.key), kv.value, kv.mod_revision, kv.lease) for kv in result.kvs]
        return items, result.header.revision

    async def delete(self, key: str) -> bool:
        """Delete `key`; return whether it existed."""
        return await self._unary("delete", lambda c: c.delete(key.encode())) is not None

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._unary("grant_lease", lambda c: c.lease(ttl))
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Renew the lease; return its TTL in seconds, <= 0 when the lease no longer exists."""
        reply = await self._unary("refresh_lease", lambda c: c.refresh_lease(lease_id))
        if reply is None:
            raise EtcdUnavailable("etcd closed the lease keep-alive stream without a reply")
        return reply.TTL

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys at once; a lease already gone is not an error."""
        try:
            await self._unary("revoke_lease", lambda c: c.revoke_lease(lease_id))
        except LeaseNotFound:
            pass

    async def compact(self, revision: int) -> None:
        """Drop the history before `revision`; compacting an already compacted revision does nothing."""
        try:
            await self._unary("compact", lambda c: c.compact(revision))
        except EtcdError as e:
            if type(e) is not EtcdError or "has been compacted" not in str(e):
                raise

    async def put_if(self, key: str, value: bytes, mod_revision: int, lease_id: int | None = None) -> tuple[bool, int, KeyValue | None]:
        """Put only if the key's mod revision is `mod_revision` (0: only if the key is absent).

        Returns (succeeded, store revision after the call, the key's current value when it failed).
        """
        k = key.encode()
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease_id or 0))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        if response.succeeded:
            return True, response.header.revision, None
        kvs = response.responses[0].response_range.kvs
        current = KeyValue(_decode(kvs[0].key), kvs[0].value, kvs[0].mod_revision, kvs[0].lease) if kvs else None
        return False, response.header.revision, current

    async def delete_if(self, key: str, mod_revision: int) -> bool:
        """Delete the key only if its mod revision is `mod_revision`; return whether it was deleted."""
        k = key.encode()
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision)],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))],
        )
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        return response.succeeded and response.responses[0].response_delete_range.deleted > 0

    async def count_prefix(self, prefix: str) -> int:
        """How many keys are under `prefix` (etcd counts; no values travel)."""
        k = prefix.encode()
        request = rpc.RangeRequest(key=k, range_end=aetcd.utils.prefix_range_end(k), count_only=True)
        response = await self._unary("count", lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata))
        return response.count

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; return how many were deleted."""
        k = prefix.encode()
        request = rpc.DeleteRangeRequest(key=k, range_end=aetcd.utils.prefix_range_end(k))
        response = await self._unary("delete_prefix", lambda c: c.kvstub.DeleteRange(request, timeout=self._timeout, metadata=c.metadata))
        return response.deleted

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Yield the changes under `prefix` from `start_revision` (inclusive) on.

        Never ends by itself: raises WatchCompacted when `start_revision` has been compacted and
        EtcdUnavailable when the stream breaks or etcd stops answering. Events of one etcd
        response are yielded without suspending in between.
        """
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        index = self._current
        client = await self._client(index)
        key = prefix.encode()
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=aetcd.utils.prefix_range_end(key), start_revision=start_revision))
        progress = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
        # "hasleader" makes a member that lost its leader end the watch rather than go quiet.
        metadata = (*(client.metadata or ()), ("hasleader", "true"))
        call = rpc.WatchStub(client.channel).Watch(metadata=metadata)
        read: asyncio.Future | None = None
        try:
            await self._write(call, create)
            awaiting_answer = True
            read = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({read}, timeout=self._timeout if awaiting_answer else self._heartbeat)
                if not done:
                    if awaiting_answer:
                        raise EtcdUnavailable(f"etcd did not answer the watch within {self._timeout:g}s")
                    await self._write(call, progress)
                    awaiting_answer = True
                    continue
                if read.cancelled():
                    raise EtcdUnavailable("the watch stream was cancelled (client closed?)")
                response = read.result()
                if response is grpc.aio.EOF:
                    raise EtcdUnavailable("etcd closed the watch stream")
                awaiting_answer = False
                read = asyncio.ensure_future(call.read())
                if response.compact_revision:
                    raise WatchCompacted(response.compact_revision)
                if response.canceled:
                    raise EtcdError(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")
                for event in response.events:
                    yield WatchEvent(
                        "delete" if event.type == rpc.Event.DELETE else "put",
                        _decode(event.kv.key),
                        event.kv.value,
                        event.kv.mod_revision,
                    )
        except rpc.AioRpcError as e:
            error = _rpc_error(e)
            if isinstance(error, EtcdUnavailable):
                self._failover(index)
            raise error from None
        except EtcdUnavailable:
            self._failover(index)
            raise
        finally:
            if read is not None and not read.done():
                read.cancel()
            call.cancel()

    async def _write(self, call: grpc.aio.StreamStreamCall, request: rpc.WatchRequest) -> None:
        try:
            await asyncio.wait_for(call.write(request), self._timeout)
        except TimeoutError:
            raise EtcdUnavailable(f"etcd did not take a watch request within {self._timeout:g}s") from None
        except asyncio.InvalidStateError:
            raise EtcdUnavailable("the watch stream is closed") from None

    def _name(self, index: int) -> str:
        host, port = self._endpoints[index]
        return f"{host}:{port}"

    async def _client(self, index: int) -> aetcd.Client:
        client = self._clients.get(index)
        if client is None:
            host, port = self._endpoints[index]
            client = aetcd.Client(host=host, port=port, timeout=self._timeout, options=dict(_CHANNEL_OPTIONS))
            self._clients[index] = client
            await client.connect()
        return client

    def _failover(self, index: int) -> None:
        if len(self._endpoints) > 1 and self._current == index:
            self._current = (index + 1) % len(self._endpoints)
            log.warning("etcd_endpoint_failover", failed=self._name(index), next=self._name(self._current))

    async def _unary(self, op: str, call: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        failures = []
        for _ in range(len(self._endpoints)):
            index = self._current
            try:
                client = await self._client(index)
                # gRPC deadlines bound each call; this guard only makes a hang impossible.
                async with asyncio.timeout(self._timeout + 1.0):
                    return await call(client)
            except aetcd.exceptions.ClientError as e:
                error = _translate(e)
            except rpc.AioRpcError as e:
                error = _rpc_error(e)
            except TimeoutError:
                error = EtcdUnavailable(f"no answer within {self._timeout:g}s")
            if not isinstance(error, EtcdUnavailable):
                raise error
            failures.append(f"{self._name(index)}: {error}")
            self._failover(index)
        raise EtcdUnavailable(f"etcd {op} failed: " + "; ".join(failures))
