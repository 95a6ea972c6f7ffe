"""Where a bot keeps what outlives one message: who owns each conversation, the conversation's
variables, and a question the bot is waiting to have answered.

`StoreState` keeps them in the Context Session Store, so they are shared by every instance and
every bot of the mesh (the only way data crosses bots). `MemoryState` keeps them in this process,
for a bot that runs without a store; it offers the same versioned semantics.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from mbc.client.context import ContextClient, Scope
from mbc.v1 import bot_pb2, common_pb2

RESERVED_PREFIX = "mbc."


class OwnershipConflict(Exception):
    """The ownership record changed since it was read."""


class Fenced(Exception):
    """A write made as the conversation's owner at a version the ownership record has moved past:
    this bot lost the conversation meanwhile (it was frozen, cut off or too slow), so the write is
    refused rather than applied."""


@dataclass(frozen=True)
class Ownership:
    owner: common_pb2.BotRef | None
    transfer_id: str
    version: int
    transfer_response: bot_pb2.TransferResponse | None = None
    """What the owner answered to `transfer_id` (None while it is being applied, or unknown)."""


@dataclass(frozen=True)
class Awaiting:
    """A question the bot asked and waits to have answered.

    A dialog step: the answer goes into `save_as`, then step `step + 1` of `intent` runs.
    A clarifying question (`intent` empty): `options` are [bot_id, intent, label] triples and
    `text` is the consumer message that was ambiguous.
    """

    intent: str = ""
    step: int = 0
    save_as: str = ""
    options: tuple = ()
    text: str = ""

    def to_json(self) -> dict:
        return {
            "intent": self.intent,
            "step": self.step,
            "save_as": self.save_as,
            "options": [list(o) for o in self.options],
            "text": self.text,
        }

    @classmethod
    def from_json(cls, value: dict) -> Awaiting:
        return cls(
            value.get("intent", ""),
            int(value.get("step", 0)),
            value.get("save_as", ""),
            tuple(tuple(o) for o in value.get("options", [])),
            value.get("text", ""),
        )


class ConversationState(Protocol):
    shared: bool
    """Whether other bots see the same records (then transfers are fenced on the owner version)."""

    async def owner(self, conversation_id: str, timeout: float) -> Ownership: ...

    async def claim(
        self,
        conversation_id: str,
        owner: common_pb2.BotRef,
        expected_version: int,
        transfer_id: str,
        timeout: float,
        response: bot_pb2.TransferResponse | None = None,
    ) -> int:
        """Record `owner` if the record is still at `expected_version`; raise OwnershipConflict otherwise.
        `response`: what `owner` answered to `transfer_id`, returned to the transfer's retries."""
        ...

    async def variables(self, conversation_id: str, timeout: float) -> dict[str, Any]: ...

    async def set_variable(self, conversation_id: str, name: str, value: Any, owner_version: int, timeout: float) -> None:
        """Write a variable while this bot owns the conversation at `owner_version`; raise Fenced otherwise."""
        ...

    async def awaiting(self, conversation_id: str, timeout: float) -> Awaiting | None: ...

    async def set_awaiting(self, conversation_id: str, awaiting: Awaiting | None, owner_version: int, timeout: float) -> None:
        """Record (None: clear) the question this bot waits on, fenced as set_variable."""
        ...


class StoreState:
    """Conversation state in the Context Session Store.

    `shared` is true: the ownership version a sender read is the one the receiver checks.

    Variables live in `namespace` (shared by the group's bots), conversation scope. The question a
    bot waits on is under `namespace`, key `mbc.awaiting.<bot_id>`: keys starting with `mbc.` are
    the mesh's own and are not variables.
    """

    def __init__(self, client: ContextClient, namespace: str, bot_id: str) -> None:
        self.client = client
        self.namespace = namespace
        self._awaiting_key = f"{RESERVED_PREFIX}awaiting.{bot_id}"

    shared = True

    async def prepare(self, ttl_seconds: int) -> None:
        await self.client.register_namespace(self.namespace, ttl_seconds)

    async def owner(self, conversation_id: str, timeout: float) -> Ownership:
        record, version = await self.client.get_owner(conversation_id, timeout=timeout)
        if record is None:
            return Ownership(None, "", 0)
        response = record.transfer_response if record.HasField("transfer_response") else None
        return Ownership(record.owner, record.transfer_id, version, response)

    async def claim(
        self,
        conversation_id: str,
        owner: common_pb2.BotRef,
        expected_version: int,
        transfer_id: str,
        timeout: float,
        response: bot_pb2.TransferResponse | None = None,
    ) -> int:
        try:
            return await self.client.claim_owner(
                conversation_id, owner, expected_version, transfer_id, timeout=timeout, transfer_response=response
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.ABORTED:
                raise OwnershipConflict(e.details()) from None
            raise

    async def variables(self, conversation_id: str, timeout: float) -> dict[str, Any]:
        values = await self.client.list(self.namespace, Scope.CONVERSATION, conversation_id, timeout=timeout)
        return {k: v for k, v in values.items() if not k.startswith(RESERVED_PREFIX)}

    async def set_variable(self, conversation_id: str, name: str, value: Any, owner_version: int, timeout: float) -> None:
        async with _fenced():
            await self.client.set(
                self.namespace, Scope.CONVERSATION, conversation_id, name, value, timeout=timeout, owner_version=owner_version
            )

    async def awaiting(self, conversation_id: str, timeout: float) -> Awaiting | None:
        value, _ = await self.client.get(self.namespace, Scope.CONVERSATION, conversation_id, self._awaiting_key, timeout=timeout)
        return Awaiting.from_json(value) if value else None

    async def set_awaiting(self, conversation_id: str, awaiting: Awaiting | None, owner_version: int, timeout: float) -> None:
        async with _fenced():
            if awaiting is None:
                await self.client.delete(
                    self.namespace,
                    Scope.CONVERSATION,
                    conversation_id,
                    self._awaiting_key,
                    timeout=timeout,
                    owner_version=owner_version,
                )
            else:
                await self.client.set(
                    self.namespace,
                    Scope.CONVERSATION,
                    conversation_id,
                    self._awaiting_key,
                    awaiting.to_json(),
                    timeout=timeout,
                    owner_version=owner_version,
                )


@contextlib.asynccontextmanager
async def _fenced():
    """The store's FAILED_PRECONDITION on a write fenced by owner_version, as Fenced."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
            raise Fenced(e.details()) from None
        raise


class MemoryState:
    """Conversation state in this process only (bounded, least recently used dropped first)."""

    shared = False

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._owners: OrderedDict[str, Ownership] = OrderedDict()
        self._variables: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._awaiting: OrderedDict[str, Awaiting] = OrderedDict()
        self._versions = itertools.count(1)

    def _bounded(self, table: OrderedDict, key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._capacity:
            table.popitem(last=False)

    async def owner(self, conversation_id: str, timeout: float) -> Ownership:
        return self._owners.get(conversation_id, Ownership(None, "", 0))

    async def claim(
        self,
        conversation_id: str,
        owner: common_pb2.BotRef,
        expected_version: int,
        transfer_id: str,
        timeout: float,
        response: bot_pb2.TransferResponse | None = None,
    ) -> int:
        current = self._owners.get(conversation_id)
        if (current.version if current else 0) != expected_version:
            raise OwnershipConflict(f"conversation {conversation_id!r} changed owner")
        version = next(self._versions)
        self._bounded(self._owners, conversation_id, Ownership(owner, transfer_id, version, response))
        return version

    async def variables(self, conversation_id: str, timeout: float) -> dict[str, Any]:
        return dict(self._variables.get(conversation_id, {}))

    def _check_owner(self, conversation_id: str, owner_version: int) -> None:
        current = self._owners.get(conversation_id)
        if current is None or current.version != owner_version:
            holder = current.owner.bot_id if current and current.owner else "nobody"
            raise Fenced(
                f"conversation {conversation_id!r} is now owned by {holder!r}; this write, made as its "
                f"owner at version {owner_version}, is refused (fenced)"
            )

    async def set_variable(self, conversation_id: str, name: str, value: Any, owner_version: int, timeout: float) -> None:
        self._check_owner(conversation_id, owner_version)
        self._bounded(self._variables, conversation_id, {**self._variables.get(conversation_id, {}), name: value})

    async def awaiting(self, conversation_id: str, timeout: float) -> Awaiting | None:
        return self._awaiting.get(conversation_id)

    async def set_awaiting(self, conversation_id: str, awaiting: Awaiting | None, owner_version: int, timeout: float) -> None:
        self._check_owner(conversation_id, owner_version)
        if awaiting is None:
            self._awaiting.pop(conversation_id, None)
        else:
            self._bounded(self._awaiting, conversation_id, awaiting)
