"""Python API of the Context Session Store, for bots and gateways.

    store = ContextClient(channels.channel("127.0.0.1:50052"))
    await store.register_namespace("retail", ttl_seconds=3600)
    version = await store.set("retail", Scope.CONVERSATION, conversation_id, "name", "Sam")
    value, version = await store.get("retail", Scope.CONVERSATION, conversation_id, "name")

Values are JSON-like Python values (str, int, float, bool, None, list, dict). JSON has one number
type: numbers that are whole come back as int.
"""

from __future__ import annotations

import enum
from typing import Any, cast

import grpc
from google.protobuf import json_format, struct_pb2

from mbc.v1 import bot_pb2, common_pb2, context_pb2, context_pb2_grpc


class Scope(enum.IntEnum):
    GLOBAL = context_pb2.SCOPE_GLOBAL
    CONSUMER = context_pb2.SCOPE_CONSUMER
    CONVERSATION = context_pb2.SCOPE_CONVERSATION


def to_value(obj: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    try:
        json_format.ParseDict(obj, value)
    except json_format.ParseError as e:
        raise TypeError(f"not a JSON-like value: {e}") from e
    return value


def from_value(value: struct_pb2.Value) -> Any:
    return _whole_numbers(json_format.MessageToDict(value))


def _whole_numbers(obj: Any) -> Any:
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    if isinstance(obj, list):
        return [_whole_numbers(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _whole_numbers(v) for k, v in obj.items()}
    return obj


class ContextClient:
    def __init__(self, channel: grpc.aio.Channel, timeout_seconds: float = 5.0) -> None:
        self._stub = context_pb2_grpc.ContextStoreStub(channel)
        self.timeout_seconds = timeout_seconds

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout_seconds if timeout is None else timeout

    @staticmethod
    def _key(namespace: str, scope: Scope | int, scope_id: str, key: str) -> context_pb2.ContextKey:
        # An int too: a caller may pass a raw wire value (the store refuses an unknown one). The stubs
        # type the field as the enum class, which the wire value is at run time.
        return context_pb2.ContextKey(namespace=namespace, scope=cast(context_pb2.Scope, int(scope)), scope_id=scope_id, key=key)

    async def register_namespace(self, namespace: str, ttl_seconds: int, timeout: float | None = None) -> None:
        await self._stub.RegisterNamespace(
            context_pb2.RegisterNamespaceRequest(namespace=namespace, ttl_seconds=ttl_seconds), timeout=self._timeout(timeout)
        )

    async def get(
        self, namespace: str, scope: Scope | int, scope_id: str, key: str, timeout: float | None = None
    ) -> tuple[Any, int]:
        """(value, version); (None, 0) when absent."""
        r = await self._stub.Get(
            context_pb2.GetContextRequest(key=self._key(namespace, scope, scope_id, key)), timeout=self._timeout(timeout)
        )
        return (from_value(r.value), r.version) if r.found else (None, 0)

    async def set(
        self,
        namespace: str,
        scope: Scope | int,
        scope_id: str,
        key: str,
        value: Any,
        expected_version: int | None = None,
        timeout: float | None = None,
        owner_version: int | None = None,
    ) -> int:
        """Write and return the new version; with expected_version, only if the key is at that version
        (raises grpc.aio.AioRpcError ABORTED otherwise); with owner_version (conversation scope),
        only while the conversation's owner record is at that version (else FAILED_PRECONDITION)."""
        request = context_pb2.SetContextRequest(key=self._key(namespace, scope, scope_id, key), value=to_value(value))
        if expected_version is not None:
            request.expected_version = expected_version
        if owner_version is not None:
            request.owner_version = owner_version
        return (await self._stub.Set(request, timeout=self._timeout(timeout))).version

    async def delete(
        self,
        namespace: str,
        scope: Scope | int,
        scope_id: str,
        key: str,
        expected_version: int | None = None,
        timeout: float | None = None,
        owner_version: int | None = None,
    ) -> bool:
        request = context_pb2.DeleteContextRequest(key=self._key(namespace, scope, scope_id, key))
        if expected_version is not None:
            request.expected_version = expected_version
        if owner_version is not None:
            request.owner_version = owner_version
        return (await self._stub.Delete(request, timeout=self._timeout(timeout))).deleted

    async def list(self, namespace: str, scope: Scope | int, scope_id: str = "", timeout: float | None = None) -> dict[str, Any]:
        r = await self._stub.List(
            context_pb2.ListContextRequest(namespace=namespace, scope=cast(context_pb2.Scope, int(scope)), scope_id=scope_id),
            timeout=self._timeout(timeout),
        )
        return {e.key: from_value(e.value) for e in r.entries}

    async def get_owner(self, conversation_id: str, timeout: float | None = None) -> tuple[context_pb2.Ownership | None, int]:
        """(ownership, version); (None, 0) when no bot has the conversation yet."""
        r = await self._stub.GetOwner(
            context_pb2.GetOwnerRequest(conversation_id=conversation_id), timeout=self._timeout(timeout)
        )
        return (r.ownership, r.version) if r.found else (None, 0)

    async def claim_owner(
        self,
        conversation_id: str,
        owner: common_pb2.BotRef,
        expected_version: int,
        transfer_id: str = "",
        timeout: float | None = None,
        transfer_response: bot_pb2.TransferResponse | None = None,
    ) -> int:
        """Record `owner` if the record is still at expected_version; returns the new version
        (raises grpc.aio.AioRpcError ABORTED when someone else changed it first). With
        `transfer_response`: what the owner answered to `transfer_id`, for that transfer's retries."""
        request = context_pb2.ClaimOwnerRequest(
            conversation_id=conversation_id,
            ownership=context_pb2.Ownership(owner=owner, transfer_id=transfer_id, transfer_response=transfer_response),
            expected_version=expected_version,
        )
        return (await self._stub.ClaimOwner(request, timeout=self._timeout(timeout))).version
