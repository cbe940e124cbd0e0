"""One shape for the background loops (usage and activity flushes, the key-cache refresh, the
GC policy): call `tick` every `seconds` until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from app.log_policy import unforeseen

logger = logging.getLogger("keyplane.background")


class Periodic:
    """Runs `tick` every `seconds` in a task: each tick starts `seconds` after the previous one
    started (at once when that one took longer), so a slow tick, a usage flush under full load
    say, does not push every later one back by its own duration. `stop` cancels it; when `lock`
    is given it is taken first, so a tick holding it (a flush mid-write) finishes instead of
    being cut off. With `jitter` (a fraction), each period is drawn from seconds * (1 +/- jitter),
    so processes started together (or a benchmark's rounds) do not stay in step with it.

    A tick that raises is logged and the loop goes on. The ticks catch the database's errors
    themselves; anything else (a bug) must not end the loop for good. Before, it did: the usage
    flushes stopped for the rest of the process's life, and `stop` re-raised the error, so the
    shutdown flush never ran and the counts it held were lost."""

    def __init__(
        self,
        seconds: float,
        tick: Callable[[], Awaitable[object]],
        lock: asyncio.Lock | None = None,
        jitter: float = 0.0,
    ) -> None:
        self.seconds = seconds
        self.jitter = jitter
        self.tick = tick
        self.lock = lock
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        clock = asyncio.get_running_loop().time
        due = clock() + self._period()
        while True:
            await asyncio.sleep(max(0.0, due - clock()))
            try:
                await self.tick()
            except Exception as exc:
                name = getattr(self.tick, "__qualname__", "a background task")
                unforeseen(logger, f"{name} failed; it runs again next period", exc)
            due = max(due + self._period(), clock())

    def _period(self) -> float:
        return self.seconds * (1 + random.uniform(-self.jitter, self.jitter))

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
