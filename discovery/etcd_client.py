"""A small asyncio etcd v3 client: the only module of the project that imports aetcd.

aetcd (pinned, unmaintained) does the unary requests. Watches use its generated gRPC stubs
directly: aetcd's own watch drops the response headers and progress responses, and it waits
forever when etcd stops answering without closing the connection (a frozen process, a network
partition). Here an idle watch sends a progress request every `heartbeat` seconds and raises
EtcdUnavailable if etcd does not answer within `timeout`.

aetcd only dials plaintext: `_AetcdClient` replaces its connect() to dial TLS (a CA, optionally a
client certificate) and to authenticate as an etcd user. etcd's simple auth tokens expire (5 min
idle by default, and all of them when etcd restarts): a request refused for an invalid token
authenticates again and is retried once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.utils
import grpc
from aetcd import rpc

from discovery.errors import (
    EtcdAuthFailed,
    EtcdError,
    EtcdLimitExceeded,
    EtcdPermissionDenied,
    EtcdSettingsError,
    EtcdUnavailable,
    LeaseNotFound,
    RevisionCompacted,
    WatchCompacted,
)
from mbc.runtime.config import EtcdAccess, split_endpoints
from mbc.runtime.logs import get_logger

log = get_logger(__name__)

T = TypeVar("T")

RECEIVE_LIMIT = 64 * 1024 * 1024
"""Largest etcd response this client takes; lists are read in pages well below it."""
PAGE_SIZE = 256
"""Keys per Range page when listing a prefix; halved on a page over RECEIVE_LIMIT (definitions
reach 1 MiB, so a page of 64 such keys would)."""
_LIST_ATTEMPTS = 3
"""Listings started again from the first page when their revision is compacted meanwhile."""

_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": RECEIVE_LIMIT,
    # gRPC's reconnect backoff otherwise grows to two minutes while etcd is down, and calls fail
    # at once during the backoff even after etcd is back.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
}

# Status codes that mean "the connection or the server is not usable right now".
_TRANSIENT = frozenset(
    {
        rpc.StatusCode.UNAVAILABLE,
        rpc.StatusCode.DEADLINE_EXCEEDED,
        rpc.StatusCode.CANCELLED,
        rpc.StatusCode.UNKNOWN,
        rpc.StatusCode.ABORTED,
        rpc.StatusCode.INTERNAL,
    }
)


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


@dataclass(frozen=True)
class KeyPermission:
    """A permission of an etcd role on the keys from `key` up to `range_end` (excluded)."""

    key: bytes
    range_end: bytes
    permission: str
    """"read", "write" or "readwrite"."""

    @classmethod
    def on_prefix(cls, prefix: str, permission: str) -> KeyPermission:
        key = prefix.encode()
        return cls(key, aetcd.utils.prefix_range_end(key), permission)

    @classmethod
    def on_key(cls, key: str, permission: str) -> KeyPermission:
        """On the one key `key` (etcd's empty range end)."""
        return cls(key.encode(), b"", permission)

    def __str__(self) -> str:
        key = self.key.decode(errors="backslashreplace")
        if not self.range_end:
            return f"{self.permission} {key}"
        if self.range_end == aetcd.utils.prefix_range_end(self.key):
            return f"{self.permission} {key}*"
        return f"{self.permission} [{key}, {self.range_end.decode(errors='backslashreplace')})"


def _parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(scheme, host, port) of "host:port", "http://host:port" or "https://host:port"; scheme "" when none is given."""
    text = endpoint.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if scheme not in ("", "http", "https"):
        raise ValueError(f"etcd endpoint {endpoint!r}: the scheme must be http or https")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return scheme, host, int(port)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the etcd {what} {path}: {e.strerror or e}") from None


def _credentials(access: EtcdAccess, tls: bool) -> grpc.ChannelCredentials | None:
    if not tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(access.ca_file, "CA file (etcd.ca_file)") if access.ca_file else None,
        private_key=_read(access.key_file, "client key (etcd.key_file)") if access.key_file else None,
        certificate_chain=_read(access.cert_file, "client certificate (etcd.cert_file)") if access.cert_file else None,
    )


def _password(access: EtcdAccess) -> str | None:
    if not access.username:
        return None
    password = _read(access.password_file, "password file (etcd.password_file)").decode().rstrip("\r\n")
    if not password:
        raise ValueError(f"the etcd password file {access.password_file} is empty")
    return password


class _TokenExpired(EtcdError):
    """etcd no longer knows this client's auth token (it expired, or etcd restarted)."""


async def _connected(client: aetcd.Client) -> aetcd.Client:
    return client


def _decode(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def _rpc_error(error: rpc.AioRpcError) -> EtcdError:
    details = error.details() or error.code().name
    if "invalid auth token" in details:
        return _TokenExpired(details)
    if "required revision has been compacted" in details:
        return RevisionCompacted(details)
    if error.code() == rpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        if f"vs. {RECEIVE_LIMIT})" in details:
            return EtcdLimitExceeded(f"an etcd response is over this client's receive limit of {RECEIVE_LIMIT} bytes ({details})")
        return EtcdLimitExceeded(f"etcd refused a request over its --max-request-bytes ({details})")
    if "request is too large" in details:
        return EtcdLimitExceeded(f"etcd refused a request over its --max-request-bytes ({details})")
    if "database space exceeded" in details:
        return EtcdLimitExceeded(
            f"etcd is out of space ({details}): its backend reached --quota-backend-bytes; compact, defragment and "
            "disarm the NOSPACE alarm (docs/operators.md, etcd in production)"
        )
    if error.code() == rpc.StatusCode.PERMISSION_DENIED:
        return EtcdPermissionDenied(details)
    if (
        "authentication failed" in details
        or "user name is empty" in details
        or "auth is not enabled" in details
        or "authentication is not enabled" in details
    ):
        return EtcdAuthFailed(details)
    if error.code() in _TRANSIENT:
        return EtcdUnavailable(details)
    if "lease not found" in details:
        return LeaseNotFound(details)
    return EtcdError(details)


def _guarded(guard: tuple[str, int] | None) -> list[rpc.Compare]:
    """The compare of a fencing guard: (key, mod revision the key must still be at)."""
    if guard is None:
        return []
    return [compare_mod(*guard)]


def compare_mod(key: str, mod_revision: int) -> rpc.Compare:
    """A transaction compare: `key` is at `mod_revision` (0: absent)."""
    return rpc.Compare(key=key.encode(), result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision)


def put_op(key: str, value: bytes, lease: int = 0) -> rpc.RequestOp:
    """A transaction operation: put `key`."""
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value, lease=lease))


def range_op(key: str) -> rpc.RequestOp:
    """A transaction operation: read `key` (its KeyValue is in `TxnResult.reads`)."""
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode()))


def delete_op(key: str) -> rpc.RequestOp:
    """A transaction operation: delete `key`."""
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did: which branch ran, the store revision after it, and for each operation
    of that branch, the key it read (`range_op`; None when absent, and for other operations)."""

    succeeded: bool
    revision: int
    reads: list[KeyValue | None]


def _translate(error: aetcd.exceptions.ClientError) -> EtcdError:
    if isinstance(error, aetcd.exceptions.RevisionCompactedError):
        return WatchCompacted(error.compacted_revision)
    if isinstance(error.__cause__, rpc.AioRpcError):
        return _rpc_error(error.__cause__)
    message = str(error) or type(error).__name__
    if isinstance(
        error,
        (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError, aetcd.exceptions.WatchTimeoutError),
    ):
        return EtcdUnavailable(message)
    return EtcdError(message)


class _AetcdClient(aetcd.Client):
    """aetcd's client, dialing TLS when given channel credentials (aetcd itself only dials plaintext)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        credentials: grpc.ChannelCredentials | None,
        username: str | None,
        password: str | None,
        timeout: float,
        options: dict,
    ) -> None:
        super().__init__(host=host, port=port, username=username, password=password, timeout=timeout, options=options)
        self._credentials = credentials
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        """Open the channel and, with a user, authenticate (the token goes in `metadata`)."""
        async with self._connect_lock:
            if self._connected.is_set():
                return
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            channel = (
                grpc.aio.secure_channel(target, self._credentials, options=options)
                if self._credentials
                else grpc.aio.insecure_channel(target, options=options)
            )
            metadata = None
            if self._username is not None:
                try:
                    reply = await rpc.AuthStub(channel).Authenticate(
                        rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout
                    )
                except BaseException:
                    await channel.close()
                    raise
                metadata = (("token", reply.token),)
            self.channel, self.metadata = channel, metadata
            self.auth_stub = rpc.AuthStub(channel)
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._connected.set()


class _KeepAliveStream:
    """One LeaseKeepAlive bidi stream: refreshes of any lease are written to it, and each answer
    goes to the oldest refresh waiting for that lease. Broken (`error` set) on the first failure,
    a timeout included: the client opens another."""

    def __init__(self, call: grpc.aio.StreamStreamCall, index: int) -> None:
        self.call = call
        self.index = index
        self.error: EtcdError | None = None
        self._waiters: dict[int, collections.deque[asyncio.Future[int]]] = {}
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read(), name="etcd lease keep-alive")

    async def refresh(self, lease_id: int, timeout: float) -> int:
        if self.error is not None:
            raise self.error
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        queue = self._waiters.setdefault(lease_id, collections.deque())
        queue.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    await self.call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await waiter
        except TimeoutError:
            self._fail(EtcdUnavailable(f"etcd did not answer a lease keep-alive within {timeout:g}s"))
            raise self.error or EtcdUnavailable("keep-alive timed out") from None
        except asyncio.InvalidStateError:
            self._fail(EtcdUnavailable("the lease keep-alive stream is closed"))
            raise self.error or EtcdUnavailable("keep-alive stream closed") from None
        except rpc.AioRpcError as e:
            self._fail(_rpc_error(e))
            raise self.error or EtcdUnavailable("keep-alive stream failed") from None
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: no "never retrieved" report when it is collected
            else:
                waiter.cancel()

    async def _read(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    self._fail(EtcdUnavailable("etcd closed the lease keep-alive stream"))
                    return
                queue = self._waiters.get(response.ID)
                while queue:
                    waiter = queue.popleft()
                    if not waiter.done():
                        waiter.set_result(response.TTL)
                        break
        except rpc.AioRpcError as e:
            self._fail(_rpc_error(e))
        except asyncio.CancelledError:
            self._fail(EtcdUnavailable("the lease keep-alive stream was closed"))
            raise

    def _fail(self, error: EtcdError) -> None:
        if self.error is None:
            self.error = error
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(self.error)
        self._waiters.clear()
        self.call.cancel()

    def close(self) -> None:
        self._fail(EtcdUnavailable("the lease keep-alive stream was closed"))
        self._reader.cancel()

    async def aclose(self) -> None:
        """close(), and wait until the reader has ended (nothing left pending when the loop closes)."""
        self.close()
        await asyncio.wait({self._reader})


class EtcdClient:
    """Connection to an etcd cluster given as "host:port" endpoints (https://host:port for TLS).

    Each request goes to the current endpoint, at first a random one (so that the clients of a
    cluster spread over its members); when that one cannot be reached the request is tried on the
    next ones, and the first that answers becomes current. Lists are read in pages of `page_size`
    keys and lease refreshes share one keep-alive stream.

    Not gRPC's round_robin over an ipv4: list of the members: watches and the keep-alive stream
    stay on one member whatever the policy, a failed member must be left for the next rather than
    retried in turn, and TLS checks each member's own name, which an ipv4: target drops. `timeout` bounds every
    request. `access` gives the TLS files and the etcd user. Errors are those of discovery.errors:
    credentials etcd refuses raise EtcdAuthFailed, a key outside the user's roles EtcdPermissionDenied.
    """

    def __init__(
        self,
        endpoints: list[str] | str,
        timeout: float = 5.0,
        *,
        heartbeat: float = 2.0,
        access: EtcdAccess | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        endpoints = list(split_endpoints(endpoints, keep_http=True))
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if timeout <= 0 or heartbeat <= 0 or page_size < 1:
            raise ValueError("timeout, heartbeat and page_size must be positive")
        parsed = [_parse_endpoint(e) for e in endpoints]
        access = access or EtcdAccess()
        schemes = {scheme for scheme, _, _ in parsed}
        self._tls = "https" in schemes or access.tls
        try:
            access.check()
            if self._tls and "http" in schemes:
                raise ValueError(
                    "etcd endpoints mix http:// with TLS (https:// endpoints or etcd.ca_file/cert_file): use one or the other"
                )
            self._credentials = _credentials(access, self._tls)
            self._password = _password(access)
        except ValueError as e:
            raise EtcdSettingsError(str(e)) from None
        self._endpoints = [(host, port) for _, host, port in parsed]
        self._username = access.username or None
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._clients: dict[int, aetcd.Client] = {}
        self._closing: set[asyncio.Task] = set()
        """Closes of connections dropped for a new auth token, deferred (`_reauthenticate`)."""
        # A random first endpoint spreads the clients of a cluster over its members.
        self._current = random.randrange(len(self._endpoints))
        self._closed = False
        self._page_size = page_size
        self._keepalive: _KeepAliveStream | None = None
        self._keepalive_lock = asyncio.Lock()
        self.keepalive_streams_opened = 0
        """LeaseKeepAlive streams opened so far: one, unless a stream broke."""
        self.pages_read = 0
        """Range pages read by listings so far."""

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
        # Status needs no key permission, so it works for any etcd user.
        await self._unary(
            "connect", lambda c: c.maintenancestub.Status(rpc.StatusRequest(), timeout=self._timeout, metadata=c.metadata)
        )

    async def close(self) -> None:
        """Close the connections; running watches end with EtcdUnavailable."""
        self._closed = True
        stream, self._keepalive = self._keepalive, None
        if stream is not None:
            await stream.aclose()
        closing = list(self._closing)
        for task in closing:
            task.cancel()  # closes its connection now
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
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
        (items,), revision = await self.get_prefixes([prefix])
        return items, revision

    async def get_prefixes(self, prefixes: Sequence[str]) -> tuple[list[list[KeyValue]], int]:
        """The keys under each of `prefixes`, all read at one store revision (returned too: watch
        each prefix from it + 1).

        Read in pages of at most `page_size` keys (fewer when a page would be over the receive
        limit), every page at the revision of the first one, so that no list is too large for one
        response. A listing whose revision is compacted between two pages starts again.
        """
        for attempt in range(1, _LIST_ATTEMPTS + 1):
            try:
                lists: list[list[KeyValue]] = []
                revision = 0
                for prefix in prefixes:
                    key = prefix.encode()
                    items, revision = await self._range_pages(key, aetcd.utils.prefix_range_end(key), revision)
                    lists.append(items)
                return lists, revision
            except RevisionCompacted:
                if attempt == _LIST_ATTEMPTS:
                    raise
                log.info("etcd_list_compacted", prefixes=list(prefixes), attempt=attempt)
        raise AssertionError("unreachable")

    async def get_at(self, key: str, revision: int) -> KeyValue | None:
        """`key` as it was at store `revision`; RevisionCompacted when that revision was compacted."""
        request = rpc.RangeRequest(key=key.encode(), revision=revision)
        response = await self._unary("get", lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata))
        kvs = response.kvs
        return KeyValue(_decode(kvs[0].key), kvs[0].value, kvs[0].mod_revision, kvs[0].lease) if kvs else None

    def _range_call(self, request: rpc.RangeRequest) -> Callable[[aetcd.Client], Awaitable[Any]]:
        return lambda c: c.kvstub.Range(request, timeout=self._timeout, metadata=c.metadata)

    async def _range_pages(self, key: bytes, range_end: bytes, revision: int) -> tuple[list[KeyValue], int]:
        """Every key in [key, range_end) at `revision` (0: the latest, returned), page by page."""
        items: list[KeyValue] = []
        limit = self._page_size
        while True:
            request = rpc.RangeRequest(key=key, range_end=range_end, limit=limit, revision=revision)
            try:
                response = await self._unary("list", self._range_call(request))
            except EtcdLimitExceeded as e:
                if limit == 1 or "receive limit" not in str(e):
                    raise EtcdLimitExceeded(f"listing from {_decode(key)!r}: {e}") from None
                limit = max(1, limit // 2)
                continue
            self.pages_read += 1
            revision = revision or response.header.revision
            items.extend(KeyValue(_decode(kv.key), kv.value, kv.mod_revision, kv.lease) for kv in response.kvs)
            if not response.more or not response.kvs:
                return items, revision
            key = response.kvs[-1].key + b"\0"

    async def delete(self, key: str) -> bool:
        """Delete `key`; return whether it existed."""
        return await self._unary("delete", lambda c: c.delete(key.encode())) is not None

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._unary("grant_lease", lambda c: c.lease(ttl))
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Renew the lease; return its TTL in seconds, <= 0 when the lease no longer exists.

        Every refresh of this client goes over one LeaseKeepAlive stream, opened on first use and
        again after it broke (on the next endpoint then)."""
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        failures = []
        attempts = len(self._endpoints)
        reauthenticated: set[int] = set()
        while True:
            stream = await self._keepalive_stream()
            try:
                return await stream.refresh(lease_id, self._timeout)
            except _TokenExpired:
                self._drop_keepalive(stream)
                if stream.index in reauthenticated:
                    raise EtcdUnavailable("etcd refused the new auth token of the keep-alive stream") from None
                reauthenticated.add(stream.index)
                await self._reauthenticate(stream.index)
            except EtcdUnavailable as e:
                self._drop_keepalive(stream)
                failures.append(f"{self._name(stream.index)}: {e}")
                self._failover(stream.index)
                attempts -= 1
                if attempts == 0:
                    raise EtcdUnavailable("etcd refresh_lease failed: " + "; ".join(failures)) from None
            except EtcdError as e:
                self._drop_keepalive(stream)
                raise self._explain(e) from None

    async def _keepalive_stream(self) -> _KeepAliveStream:
        async with self._keepalive_lock:
            stream = self._keepalive
            if stream is not None and stream.error is None:
                return stream
            client = await self._unary("keepalive", _connected)
            index = self._current
            call = client.leasestub.LeaseKeepAlive(metadata=client.metadata)
            self._keepalive = _KeepAliveStream(call, index)
            self.keepalive_streams_opened += 1
            log.debug("etcd_keepalive_stream_opened", endpoint=self._name(index), count=self.keepalive_streams_opened)
            return self._keepalive

    def _drop_keepalive(self, stream: _KeepAliveStream) -> None:
        stream.close()
        if self._keepalive is stream:
            self._keepalive = None

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys at once; a lease already gone is not an error."""
        with contextlib.suppress(LeaseNotFound):
            await self._unary("revoke_lease", lambda c: c.revoke_lease(lease_id))

    async def compact(self, revision: int) -> None:
        """Drop the history before `revision`; compacting an already compacted revision does nothing."""
        with contextlib.suppress(RevisionCompacted):
            await self._unary("compact", lambda c: c.compact(revision))

    async def put_if(
        self, key: str, value: bytes, mod_revision: int, lease_id: int | None = None, guard: tuple[str, int] | None = None
    ) -> tuple[bool, int, KeyValue | None]:
        """Put only if the key's mod revision is `mod_revision` (0: only if the key is absent), and,
        with `guard` (another key, its mod revision), only if that key is at that revision too.

        Returns (succeeded, store revision after the call, the key's current value when it failed).
        """
        k = key.encode()
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision),
                *_guarded(guard),
            ],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease_id or 0))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        if response.succeeded:
            return True, response.header.revision, None
        kvs = response.responses[0].response_range.kvs
        current = KeyValue(_decode(kvs[0].key), kvs[0].value, kvs[0].mod_revision, kvs[0].lease) if kvs else None
        return False, response.header.revision, current

    async def txn(
        self, compare: list[rpc.Compare], success: list[rpc.RequestOp], failure: list[rpc.RequestOp] | None = None
    ) -> TxnResult:
        """One etcd transaction built of `compare_mod`, `put_op`, `range_op` and `delete_op`: if every
        compare holds, the `success` operations run, else the `failure` ones."""
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure or [])
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        reads: list[KeyValue | None] = []
        for r in response.responses:
            kvs = r.response_range.kvs if r.WhichOneof("response") == "response_range" else []
            reads.append(KeyValue(_decode(kvs[0].key), kvs[0].value, kvs[0].mod_revision, kvs[0].lease) if kvs else None)
        return TxnResult(response.succeeded, response.header.revision, reads)

    async def put_unless_held(self, key: str, value: bytes, lease_id: int) -> KeyValue | None:
        """Put `key` under `lease_id` only if the key is absent or already attached to that lease.

        Returns None when written, else the key as it is (held by another lease, or by none).
        """
        k = key.encode()
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease_id))
        own = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.LEASE, lease=lease_id)],
            success=[put],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0)],
            success=[put],
            failure=[rpc.RequestOp(request_txn=own)],
        )
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        if response.succeeded:
            return None
        inner = response.responses[0].response_txn  # one transaction: the key exists here
        if inner.succeeded:
            return None
        kv = inner.responses[0].response_range.kvs[0]
        return KeyValue(_decode(kv.key), kv.value, kv.mod_revision, kv.lease)

    async def delete_if(self, key: str, mod_revision: int, guard: tuple[str, int] | None = None) -> bool:
        """Delete the key only if its mod revision is `mod_revision` (and `guard` holds, as in
        put_if); return whether it was deleted."""
        k = key.encode()
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=mod_revision),
                *_guarded(guard),
            ],
            success=[rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))],
        )
        response = await self._unary("txn", lambda c: c.kvstub.Txn(request, timeout=self._timeout, metadata=c.metadata))
        return response.succeeded and response.responses[0].response_delete_range.deleted > 0

    async def delete_if_leased(self, key: str, lease_id: int) -> bool:
        """Delete the key only if it is attached to `lease_id`; return whether it was deleted."""
        k = key.encode()
        request = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, result=rpc.Compare.EQUAL, target=rpc.Compare.LEASE, lease=lease_id)],
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
        response = await self._unary(
            "delete_prefix", lambda c: c.kvstub.DeleteRange(request, timeout=self._timeout, metadata=c.metadata)
        )
        return response.deleted

    async def lease_ttl(self, lease_id: int) -> tuple[int, int]:
        """(remaining, granted) TTL of a lease in seconds; remaining is -1 when the lease is gone."""
        request = rpc.LeaseTimeToLiveRequest(ID=lease_id)
        reply = await self._unary(
            "lease_ttl", lambda c: c.leasestub.LeaseTimeToLive(request, timeout=self._timeout, metadata=c.metadata)
        )
        return reply.TTL, reply.grantedTTL

    # -- users and roles (the caller authenticates as root, or etcd has no auth enabled yet) --

    async def _auth(self, method: str, request) -> Any:
        # Any: the reply is one of aetcd's generated Auth*Response messages, which carry no types.
        return await self._unary(
            method, lambda c: getattr(rpc.AuthStub(c.channel), method)(request, timeout=self._timeout, metadata=c.metadata)
        )

    async def users(self) -> list[str]:
        return list((await self._auth("UserList", rpc.AuthUserListRequest())).users)

    async def roles(self) -> list[str]:
        return list((await self._auth("RoleList", rpc.AuthRoleListRequest())).roles)

    async def add_user(self, name: str, password: str) -> None:
        await self._auth("UserAdd", rpc.AuthUserAddRequest(name=name, password=password))

    async def change_password(self, name: str, password: str) -> None:
        await self._auth("UserChangePassword", rpc.AuthUserChangePasswordRequest(name=name, password=password))

    async def user_roles(self, name: str) -> list[str]:
        return list((await self._auth("UserGet", rpc.AuthUserGetRequest(name=name))).roles)

    async def grant_role(self, user: str, role: str) -> None:
        await self._auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))

    async def add_role(self, name: str) -> None:
        await self._auth("RoleAdd", rpc.AuthRoleAddRequest(name=name))

    async def role_permissions(self, role: str) -> set[KeyPermission]:
        reply = await self._auth("RoleGet", rpc.AuthRoleGetRequest(role=role))
        return {KeyPermission(perm.key, perm.range_end, rpc.Permission.Type.Name(perm.permType).lower()) for perm in reply.perm}

    async def grant_permission(self, role: str, permission: KeyPermission) -> None:
        perm = rpc.Permission(
            permType=rpc.Permission.Type.Value(permission.permission.upper()), key=permission.key, range_end=permission.range_end
        )
        await self._auth("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm))

    async def revoke_permission(self, role: str, permission: KeyPermission) -> None:
        await self._auth(
            "RoleRevokePermission",
            rpc.AuthRoleRevokePermissionRequest(role=role, key=permission.key, range_end=permission.range_end),
        )

    async def enable_auth(self) -> None:
        await self._auth("AuthEnable", rpc.AuthEnableRequest())

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[WatchEvent, None]:
        """Yield the changes under `prefix` from `start_revision` (inclusive) on.

        Never ends by itself: raises WatchCompacted when `start_revision` has been compacted and
        EtcdUnavailable when the stream breaks or etcd stops answering. Events of one etcd
        response are yielded without suspending in between.
        """
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        # Connecting (and authenticating) goes through _unary: errors translated, endpoints tried in turn.
        client = await self._unary("watch", _connected)
        index = self._current
        key = prefix.encode()
        create = rpc.WatchRequest(
            create_request=rpc.WatchCreateRequest(
                key=key, range_end=aetcd.utils.prefix_range_end(key), start_revision=start_revision
            )
        )
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
                    reason = response.cancel_reason or "no reason given"
                    if "invalid auth token" in reason:
                        await self._reauthenticate(index)
                        raise EtcdUnavailable(f"the watch needs a new auth token ({reason})")
                    if "permission denied" in reason:
                        raise self._explain(EtcdPermissionDenied(reason))
                    raise EtcdError(f"etcd cancelled the watch: {reason}")
                for event in response.events:
                    yield WatchEvent(
                        "delete" if event.type == rpc.Event.DELETE else "put",
                        _decode(event.kv.key),
                        event.kv.value,
                        event.kv.mod_revision,
                    )
        except rpc.AioRpcError as e:
            error = _rpc_error(e)
            if isinstance(error, _TokenExpired):
                await self._reauthenticate(index)
                raise EtcdUnavailable(f"the watch needs a new auth token ({error})") from None
            if isinstance(error, EtcdUnavailable):
                self._failover(index)
            raise self._explain(error) from None
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
            client = _AetcdClient(
                host,
                port,
                credentials=self._credentials,
                username=self._username,
                password=self._password,
                timeout=self._timeout,
                options=dict(_CHANNEL_OPTIONS),
            )
            self._clients[index] = client
        await client.connect()
        return client

    async def _reauthenticate(self, index: int, expired: aetcd.Client | None = None) -> None:
        """Drop the connection of endpoint `index`, so that the next request authenticates again.

        `expired`: the connection whose token etcd refused. Concurrent requests all see the token
        expire; once one of them has replaced that connection, the others retry on the new one
        instead of dropping it under it. The dropped connection is closed only once the calls still
        on it have had their time (`timeout`): closed at once, they failed UNAVAILABLE instead of
        getting etcd's answer (an expired token: retried)."""
        client = self._clients.get(index)
        if client is None or (expired is not None and client is not expired):
            return
        del self._clients[index]
        log.info("etcd_reauthenticating", endpoint=self._name(index), user=self._username)
        closing = asyncio.get_running_loop().create_task(self._close_later(client))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def _close_later(self, client: aetcd.Client) -> None:
        try:
            await asyncio.sleep(self._timeout + 1.0)
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    def _tls_hint(self, failures: list[str]) -> str:
        """What to check when the failures look like a TLS mismatch rather than etcd being down."""
        if not self._tls and any("Socket closed" in f or "Connection reset" in f for f in failures):
            return " (if etcd serves TLS, give https:// endpoints or etcd.ca_file)"
        if self._tls and any(s in f for f in failures for s in ("Unwrap failed", "TSI_", "SSL", "handshake", "certificate")):
            return (
                " (the TLS handshake failed: check etcd.ca_file, and etcd.cert_file/key_file when etcd "
                "asks for client certificates)"
            )
        return ""

    def _explain(self, error: EtcdError) -> EtcdError:
        """The error with what to check when it comes from the credentials or the TLS settings."""
        text = str(error)
        if isinstance(error, EtcdAuthFailed):
            if "user name is empty" in text:
                return EtcdAuthFailed(f"etcd requires authentication ({text}): set etcd.username and etcd.password_file")
            if "not enabled" in text:
                return EtcdAuthFailed(f"etcd user {self._username!r} given, but etcd has no authentication enabled ({text})")
            return EtcdAuthFailed(f"etcd refused user {self._username!r}: {text}")
        if isinstance(error, EtcdPermissionDenied):
            return EtcdPermissionDenied(f"etcd user {self._username!r} is not allowed this ({text}); see `mbc etcd-auth`")
        return error

    def _failover(self, index: int) -> None:
        if len(self._endpoints) > 1 and self._current == index:
            self._current = (index + 1) % len(self._endpoints)
            log.warning("etcd_endpoint_failover", failed=self._name(index), next=self._name(self._current))

    async def _unary(self, op: str, call: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        if self._closed:
            raise EtcdUnavailable("etcd client is closed")
        failures = []
        attempts = len(self._endpoints)
        reauthenticated: set[int] = set()
        while attempts > 0:
            index = self._current
            client: aetcd.Client | None = None
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
            if isinstance(error, _TokenExpired) and index not in reauthenticated:
                reauthenticated.add(index)
                await self._reauthenticate(index, client)
                continue
            if not isinstance(error, EtcdUnavailable):
                raise self._explain(error) from None
            attempts -= 1
            failures.append(f"{self._name(index)}: {error}")
            self._failover(index)
        raise EtcdUnavailable(f"etcd {op} failed: " + "; ".join(failures) + self._tls_hint(failures))
