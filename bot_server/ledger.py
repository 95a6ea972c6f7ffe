"""Bounded in-process memory of conversations and transfers.

`ConversationLedger` remembers which bot took each conversation this instance handed over, so a
message sent to the wrong bot gets a clear error naming the owner. `TransferLedger` makes a retried
Transfer (same id) return the first attempt's result instead of running the dialog twice.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Awaitable, Callable, Generic, TypeVar

from mbc.v1 import common_pb2

T = TypeVar("T")


class ConversationLedger:
    def __init__(self, capacity: int = 100_000) -> None:
        self._owners: OrderedDict[str, common_pb2.BotRef] = OrderedDict()
        self._capacity = capacity

    def handed_over(self, conversation_id: str, owner: common_pb2.BotRef) -> None:
        self._owners[conversation_id] = owner
        self._owners.move_to_end(conversation_id)
        while len(self._owners) > self._capacity:
            self._owners.popitem(last=False)

    def taken(self, conversation_id: str) -> None:
        """This bot owns the conversation (again)."""
        self._owners.pop(conversation_id, None)

    def owner_elsewhere(self, conversation_id: str) -> common_pb2.BotRef | None:
        return self._owners.get(conversation_id)


class TransferLedger(Generic[T]):
    def __init__(self, capacity: int = 10_000) -> None:
        self._results: OrderedDict[str, asyncio.Future[T]] = OrderedDict()
        self._capacity = capacity

    async def run_once(self, transfer_id: str, run: Callable[[], Awaitable[T]]) -> T:
        """Run `run` for the first call with this id; concurrent and later calls get its result."""
        future = self._results.get(transfer_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._results[transfer_id] = future
            while len(self._results) > self._capacity:
                self._results.popitem(last=False)
            try:
                future.set_result(await run())
            except BaseException as e:
                self._results.pop(transfer_id, None)
                if isinstance(e, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(e)
                    future.exception()  # retrieved: waiters re-raise it, nobody else must
                raise
        return await asyncio.shield(future)
