"""One coroutine kept running as an asyncio task between `start()` and `stop()`: the shape of every
etcd watcher here (participants, routers, followed values)."""

from __future__ import annotations

import asyncio


class BackgroundLoop:
    """Runs `_run()` as one task named `task_name` from `start()` (again if it ended) until `stop()`."""

    task_name = "background-loop"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _run(self) -> None:
        raise NotImplementedError
