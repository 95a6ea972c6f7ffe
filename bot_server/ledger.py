"""`TransferLedger` makes a retried Transfer (same id) return the first attempt's result instead
of running the dialog twice; bounded, in-process.

It covers the retries that reach the same instance. With a Context Session Store, a retry that
reaches another instance of the bot finds the first attempt's answer in the conversation's owner
record, where the engine keeps it (`BotEngine._record_applied`, `_applied_elsewhere`); without a
store, this ledger is the only one, as every instance has its own conversations."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


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
