"""Garbage-collector policy for a process holding a large key cache.

CPython's full (generation 2) collection walks every tracked object. With 100,000 cached keys
that is ~0.5 million objects and a 170-450 ms pause of the event loop: every request in flight
waits, which is what the p99 of a busy verify endpoint shows. The cached records are acyclic
(reference counting frees them when an entry goes), so the cyclic collector has nothing to
find among them. So, every 10 s (or every `cache_refresh_seconds` if shorter), the objects
that have survived are moved to the permanent generation (`gc.freeze()`), and full collections
then only walk what was created since. Once an hour everything is unfrozen and fully
collected, so cyclic garbage that happened to be frozen (a caught exception's frames, say) is
reclaimed: one pause an hour instead of one every few seconds.
"""

from __future__ import annotations

import gc
import time

from app.background import Periodic

FULL_COLLECTION_SECONDS = 3600.0


class GcPolicy:
    def __init__(self, freeze_every_seconds: float) -> None:
        self.freeze_every_seconds = freeze_every_seconds
        self._loop = Periodic(freeze_every_seconds, self._tick)
        self.last_full = time.monotonic()

    def tick(self) -> None:
        """Freeze the survivors; once an hour, collect everything first."""
        if time.monotonic() - self.last_full >= FULL_COLLECTION_SECONDS:
            gc.unfreeze()
            gc.collect()
            self.last_full = time.monotonic()
        gc.freeze()

    async def _tick(self) -> None:
        self.tick()

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        gc.unfreeze()
