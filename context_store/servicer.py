"""mbc.v1.ContextStore over gRPC: translates protobuf to `ContextStoreCore` calls and errors to status codes."""

from __future__ import annotations

from contextlib import asynccontextmanager

import grpc

from context_store.access import GroupAccess, PermissionDenied
from context_store.core import ContextStoreCore, Fenced, InvalidArgument, LimitExceeded, NotFound, StoreError, VersionConflict
from discovery.errors import EtcdUnavailable
from mbc.runtime.logs import bind_context, get_logger
from mbc.runtime.security import Authorizer
from mbc.v1 import context_pb2, context_pb2_grpc

log = get_logger(__name__)

_CODES = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    VersionConflict: grpc.StatusCode.ABORTED,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Fenced: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


@asynccontextmanager
async def _status(context: grpc.aio.ServicerContext):
    try:
        yield
    except StoreError as e:
        log.info("store_rejected", code=_CODES[type(e)].name, reason=str(e))
        await context.abort(_CODES[type(e)], str(e))
    except EtcdUnavailable as e:
        log.warning("store_unavailable", reason=str(e))
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the store cannot reach etcd: {e}")


def _optional(message, field: str) -> int | None:
    return getattr(message, field) if message.HasField(field) else None


class ContextStoreServicer(context_pb2_grpc.ContextStoreServicer):
    """With mTLS (`authorizer.enabled`), every call needs a mesh identity; a namespace is read and
        written only by bots of its group, a conversation claimed only by bots of its group
        (context_store/access.py); GetOwner is open to every identity (gateways ask it), the answer of
    the record's transfer to the bots of the owner's group only."""

    def __init__(self, core: ContextStoreCore, authorizer: Authorizer | None = None) -> None:
        self.core = core
        self.authorizer = authorizer or Authorizer(False)
        self.access = GroupAccess(core)

    async def RegisterNamespace(self, request, context):
        caller = await self.authorizer.caller(context)
        async with _status(context):
            await self.access.register(caller, request.namespace)
            ttl = await self.core.register_namespace(request.namespace, request.ttl_seconds)
            return context_pb2.RegisterNamespaceResponse(namespace=request.namespace, ttl_seconds=ttl)

    async def Get(self, request, context):
        caller = await self.authorizer.caller(context)
        async with _status(context):
            await self.access.check(caller, request.key.namespace, "read")
            entry = await self.core.get(request.key)
            if entry is None:
                return context_pb2.GetContextResponse(found=False)
            return context_pb2.GetContextResponse(found=True, value=entry.value, version=entry.version)

    async def Set(self, request, context):
        with bind_context(conversation_id=request.key.scope_id if request.key.scope == context_pb2.SCOPE_CONVERSATION else None):
            caller = await self.authorizer.caller(context)
            async with _status(context):
                await self.access.check(caller, request.key.namespace, "write")
                entry = await self.core.set(
                    request.key, request.value, _optional(request, "expected_version"), _optional(request, "owner_version")
                )
                return context_pb2.SetContextResponse(
                    written=True, version=entry.version, expires_at_unix_ms=entry.expires_at_unix_ms
                )

    async def Delete(self, request, context):
        caller = await self.authorizer.caller(context)
        async with _status(context):
            await self.access.check(caller, request.key.namespace, "write")
            deleted = await self.core.delete(
                request.key, _optional(request, "expected_version"), _optional(request, "owner_version")
            )
            return context_pb2.DeleteContextResponse(deleted=deleted)

    async def List(self, request, context):
        caller = await self.authorizer.caller(context)
        async with _status(context):
            await self.access.check(caller, request.namespace, "read")
            entries = await self.core.list(request.namespace, request.scope, request.scope_id)
            return context_pb2.ListContextResponse(
                entries=[context_pb2.ContextEntry(key=e.key, value=e.value, version=e.version) for e in entries]
            )

    async def GetOwner(self, request, context):
        with bind_context(conversation_id=request.conversation_id):
            caller = await self.authorizer.caller(context)
            async with _status(context):
                ownership, version = await self.core.get_owner(request.conversation_id)
                if ownership is None:
                    return context_pb2.GetOwnerResponse(found=False)
                if caller is not None and not (caller.kind == "bot" and caller.group == ownership.owner.group):
                    # The replies of a transfer are the conversation's: for the bots of its group only.
                    ownership.ClearField("transfer_response")
                return context_pb2.GetOwnerResponse(found=True, ownership=ownership, version=version)

    async def ClaimOwner(self, request, context):
        with bind_context(conversation_id=request.conversation_id, bot_id=request.ownership.owner.bot_id):
            caller = await self.authorizer.caller(context)
            async with _status(context):
                await self.access.claim(caller, request.conversation_id)
                version = await self.core.claim_owner(request.conversation_id, request.ownership, request.expected_version)
                log.info("owner_claimed", transfer_id=request.ownership.transfer_id, version=version)
                return context_pb2.ClaimOwnerResponse(version=version)
