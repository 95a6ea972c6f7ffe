"""Which group a namespace and a conversation belong to, and who may touch them (with mTLS).

etcd layout (next to core.py's):
    /mbc/v1/context/namespace-groups/<namespace>       → group (bytes), no lease
    /mbc/v1/conversations/<conversation id>/group      → group (bytes), outlives the owner record

A namespace is bound to the group of the first bot that registers it (RegisterNamespace, which
every bot does for its `context_namespace` at start); from then on only bots of that group may
register it again, read it or write it. A conversation is bound to the group of the first bot
that claims it; from then on only bots of that group may claim it. Bindings never change (an
operator re-binds a namespace by deleting its key with etcdctl). Without mTLS (`caller` None)
nothing is checked and nothing is bound.
"""

from __future__ import annotations

from context_store.core import PREFIX, ContextStoreCore, StoreError, check_namespace, owner_key
from mbc.runtime.security import Identity, refusal

NAMESPACE_GROUPS = PREFIX + "namespace-groups/"


class PermissionDenied(StoreError):
    pass


def conversation_group_key(conversation_id: str) -> str:
    return owner_key(conversation_id).removesuffix("/owner") + "/group"


class GroupAccess:
    def __init__(self, core: ContextStoreCore) -> None:
        self.core = core
        self._namespace_groups: dict[str, str] = {}  # bindings never change: cached for good

    async def namespace_group(self, namespace: str) -> str:
        """The group `namespace` is bound to; empty when it is not bound yet."""
        group = self._namespace_groups.get(namespace)
        if group is None:
            check_namespace(namespace)
            kv = await self.core.etcd.get(NAMESPACE_GROUPS + namespace)
            if kv is None:
                return ""
            group = self._namespace_groups[namespace] = kv.value.decode()
        return group

    async def register(self, caller: Identity | None, namespace: str) -> None:
        """Before RegisterNamespace: bind an unbound namespace to the caller's group, or check it."""
        if caller is None:
            return
        if caller.kind != "bot":
            raise PermissionDenied(f"{caller} may not register namespace {namespace!r}: only bots may")
        if not await self.namespace_group(namespace):
            check_namespace(namespace)
            ok, _, _ = await self.core.etcd.put_if(NAMESPACE_GROUPS + namespace, caller.group.encode(), 0)
            if ok:
                self._namespace_groups[namespace] = caller.group
        await self.check(caller, namespace, "register")

    async def check(self, caller: Identity | None, namespace: str, action: str) -> None:
        """Only bots of the namespace's group may `action` (read, write) it."""
        if caller is None:
            return
        group = await self.namespace_group(namespace)
        if not group:
            raise PermissionDenied(
                f"namespace {namespace!r} belongs to no group yet: a bot of its group must register it first (RegisterNamespace)"
            )
        reason = refusal(caller, group, action=f"{action} namespace {namespace!r}")
        if reason:
            raise PermissionDenied(reason)

    async def claim(self, caller: Identity | None, conversation_id: str) -> None:
        """Before ClaimOwner: bind a new conversation to the caller's group, or check it, and keep
        the binding alive at least as long as the owner record the claim writes."""
        if caller is None:
            return
        if caller.kind != "bot":
            raise PermissionDenied(f"{caller} may not claim conversation {conversation_id!r}: only bots may")
        key = conversation_group_key(conversation_id)
        ttl = self.core.config.conversation_ttl_seconds + self.core.config.lease_bucket_seconds
        current = await self.core.etcd.get(key)
        self._check_conversation(caller, conversation_id, current)
        ok, _, now_current = await self.core._put_if(key, caller.group.encode(), current.mod_revision if current else 0, ttl)
        if not ok:  # bound or refreshed concurrently (and so kept alive): check against that binding
            self._check_conversation(caller, conversation_id, now_current)

    @staticmethod
    def _check_conversation(caller: Identity, conversation_id: str, binding) -> None:
        group = binding.value.decode() if binding else caller.group
        reason = refusal(caller, group, action=f"claim conversation {conversation_id!r}")
        if reason:
            raise PermissionDenied(reason)
