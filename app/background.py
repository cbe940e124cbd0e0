"""One shape for the background loops (usage and activity flushes, the key-cache refresh, the
GC policy): call `tick` every `seconds` until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    """Runs `tick` every `seconds` in a task: each tick starts `seconds` after the previous one
    started (at once when that one took longer), so a slow tick, a usage flush under full load
    say, does not push every later one back by its own duration. `stop` cancels it; when `lock`
    is given it is taken first, so a tick holding it (a flush mid-write) finishes instead of
    being cut off."""

    def __init__(
        self,
        seconds: float,
        tick: Callable[[], Awaitable[object]],
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.seconds = seconds
        self.tick = tick
        self.lock = lock
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        clock = asyncio.get_running_loop().time
        due = clock() + self.seconds
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            await self.tick()
            due = max(due + self.seconds, clock())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        if self.lock is not None:
            async with self.lock:
                self._task.cancel()
        else:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
