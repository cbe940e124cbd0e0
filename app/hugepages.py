"""Huge pages for a process holding a large key cache (Linux).

With 100,000 cached keys the heap is a few hundred MiB of small objects, and a verification
touches several of them (the cache's hash slot, the entry, the record, its tally, the rendered
body) at addresses no recent request touched. With 4 KiB pages nearly each of those is a TLB
miss as well as a cache miss, and under a hypervisor a TLB miss walks two sets of page tables.
The same heap on 2 MiB pages needs a few hundred TLB entries, not tens of thousands: measured on
the bench machine (KVM), a server answering for 100,000 hot keys of 1,000,000 did about 5% more
verifications per CPU second once its heap was on huge pages (README, Performance).

Most kernels ship transparent huge pages as `madvise` (only for memory that asks), and CPython's
allocator does not ask. So every HEAP_PAGES_SECONDS a worker thread reads this process's
mappings and asks the kernel to collapse (`MADV_COLLAPSE`, Linux 6.1+) each 2 MiB-aligned stretch
of private anonymous memory in which at least DENSE_PAGES of the 512 small pages are already
resident, so resident memory grows by at most an eighth of what is collapsed (thread stacks and
other sparse mappings are left alone). The collapse copies memory in the kernel, off the event
loop; a stretch that is already a huge page costs a page-table lookup. Where the kernel cannot do
it (not Linux, an older kernel, THP disabled) the first attempt says so in the log and the task
stops trying. `KEYPLANE_HUGE_PAGES=false` turns it off.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from app.background import Periodic

logger = logging.getLogger("keyplane.hugepages")

HUGE = 2 << 20  # bytes in a PMD-sized (x86-64, arm64 with 4 KiB pages) transparent huge page
SMALL = mmap.PAGESIZE
DENSE_PAGES = (HUGE // SMALL) * 7 // 8  # resident small pages a stretch needs to be collapsed
MADV_COLLAPSE = 25
HEAP_PAGES_SECONDS = 10.0


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    name: str


def parse_maps(lines: Iterable[str]) -> Iterator[Mapping]:
    """The mappings of a /proc/<pid>/maps text."""
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        low, _, high = parts[0].partition("-")
        name = parts[5].strip() if len(parts) > 5 else ""
        yield Mapping(int(low, 16), int(high, 16), parts[1], name)


def heap_stretches(mappings: Iterable[Mapping]) -> Iterator[tuple[int, int]]:
    """(start, end) of the 2 MiB-aligned stretches inside private anonymous read-write memory
    (the allocator's arenas and `[heap]`): the candidates for a huge page."""
    for m in mappings:
        if m.perms != "rw-p" or m.name not in ("", "[heap]"):
            continue
        start = -(-m.start // HUGE) * HUGE
        end = m.end // HUGE * HUGE
        if end > start:
            yield start, end


class _Libc:
    """madvise and mincore, typed once per process (`_libc`)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.madvise.restype = ctypes.c_int
        self.mincore = libc.mincore
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.mincore.restype = ctypes.c_int

    def dense(self, start: int, end: int) -> list[tuple[int, int]]:
        """The 2 MiB stretches of [start, end) with at least DENSE_PAGES resident small pages,
        merged into runs."""
        pages = (end - start) // SMALL
        vector = (ctypes.c_ubyte * pages)()
        if self.mincore(start, end - start, vector) != 0:
            return []  # unmapped meanwhile (the allocator returned an arena)
        resident = bytes(vector)  # a byte per page; 0: not resident
        per = HUGE // SMALL
        runs: list[tuple[int, int]] = []
        for index in range(0, pages, per):
            if per - resident.count(0, index, index + per) < DENSE_PAGES:
                continue
            low = start + index * SMALL
            if runs and runs[-1][1] == low:
                runs[-1] = (runs[-1][0], low + HUGE)
            else:
                runs.append((low, low + HUGE))
        return runs

    def collapse(self, start: int, end: int) -> int:
        """0, or the errno of MADV_COLLAPSE on [start, end)."""
        if self.madvise(start, end - start, MADV_COLLAPSE) == 0:
            return 0
        return ctypes.get_errno()


@dataclass
class Collapsed:
    """What one pass asked of the kernel."""

    asked: int = 0  # bytes of dense stretches
    failed: int = 0  # of those, bytes the kernel did not collapse this time
    refused: int = 0  # an errno saying it cannot (EINVAL: no MADV_COLLAPSE, THP off), or 0


@functools.cache
def _libc() -> _Libc:
    return _Libc()


def collapse_heap(maps_path: str = "/proc/self/maps") -> Collapsed:
    """Collapse the dense stretches of this process's heap into huge pages."""
    libc = _libc()
    with open(maps_path) as maps:
        mappings = list(parse_maps(maps))
    out = Collapsed()
    for start, end in heap_stretches(mappings):
        for low, high in libc.dense(start, end):
            error = libc.collapse(low, high)
            out.asked += high - low
            if error:  # EAGAIN, ENOMEM: no huge page to be had now, or unmapped meanwhile
                out.failed += high - low
            if error in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                out.refused = error
    return out


class HeapPages:
    """Collapses the heap into huge pages every HEAP_PAGES_SECONDS, in a worker thread."""

    def __init__(
        self,
        enabled: bool,
        seconds: float = HEAP_PAGES_SECONDS,
        collapse: Callable[[], Collapsed] | None = None,
    ) -> None:
        self.enabled = enabled and os.path.exists("/proc/self/maps")
        self._loop = Periodic(seconds, self._tick)
        # One pass over the heap; a test gives its own (never patch the module's: every other
        # HeapPages in the process, a running app's, would call it too).
        self._collapse = collapse or collapse_heap
        self.collapsed = 0  # bytes collapsed (or already huge) by the largest pass so far

    async def _tick(self) -> None:
        if not self.enabled:
            return
        try:
            done = await asyncio.to_thread(self._collapse)
        except (OSError, AttributeError) as exc:  # AttributeError: no madvise/mincore symbol
            self.enabled = False
            logger.info("huge pages for the heap are not available here (%s)", exc)
            return
        collapsed = done.asked - done.failed
        if done.refused and not self.collapsed:
            # Refused before anything worked: this kernel cannot (a later refusal is taken to be
            # one mapping's, and the next pass tries again).
            self.enabled = False
            reason = os.strerror(done.refused)
            logger.info("huge pages are not available here (MADV_COLLAPSE: %s)", reason)
            return
        if self.collapsed < 64 * HUGE <= collapsed:  # said once, when it first amounts to much
            logger.info("heap on huge pages: %d MiB", collapsed >> 20)
        self.collapsed = max(self.collapsed, collapsed)

    async def start(self) -> None:
        if self.enabled:
            self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
