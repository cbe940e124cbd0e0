"""The heap on transparent huge pages (app.hugepages): which memory is asked for, that the kernel
really collapses it, that sparse memory is left alone, and the setting."""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import sys

import pytest

from app import hugepages
from app.hugepages import (
    HUGE,
    SMALL,
    Collapsed,
    HeapPages,
    collapse_heap,
    heap_stretches,
    parse_maps,
)
from app.settings import Settings, SettingsError

MAPS = """\
55d4c0a00000-55d4c0a3c000 r--p 00000000 08:01 1234   /usr/bin/python3.11
55d4c1000000-55d4c1801000 rw-p 00000000 00:00 0      [heap]
7f0000100000-7f0000900000 rw-p 00000000 00:00 0
7f0000900000-7f0000a00000 rw-p 00000000 00:00 0
7f0001000000-7f0001400000 rw-p 00000000 08:01 99     /tmp/some-file
7f0002000000-7f0002400000 rw-s 00000000 00:01 7      /dev/zero (deleted)
7f0003000000-7f0003400000 ---p 00000000 00:00 0
7ffd00000000-7ffd00800000 rw-p 00000000 00:00 0      [stack]
"""

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="huge pages are collapsed on Linux only"
)


def test_only_private_anonymous_memory_is_a_candidate_in_whole_aligned_stretches() -> None:
    stretches = list(heap_stretches(parse_maps(MAPS.splitlines())))
    assert stretches == [
        # [heap] 0x55d4c1000000-0x55d4c1801000: the aligned 8 MiB inside it
        (0x55D4C1000000, 0x55D4C1800000),
        # an anonymous 8 MiB starting 1 MiB past a boundary: the 6 MiB of whole huge pages
        (0x7F0000200000, 0x7F0000800000),
    ]
    # Too small for a huge page, file-backed, shared, inaccessible and the stack: left alone.


def _huge_bytes() -> int:
    """This process's anonymous memory on transparent huge pages, as the kernel reports it."""
    with open("/proc/self/smaps_rollup") as smaps:
        for line in smaps:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def _private(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _address(region: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(region))


def _resident(libc: hugepages._Libc, start: int, end: int) -> int:
    import ctypes

    vector = (ctypes.c_ubyte * ((end - start) // SMALL))()
    assert libc.mincore(start, end - start, vector) == 0
    return sum(1 for b in bytes(vector) if b & 1)


@linux_only
def test_dense_memory_is_collapsed_and_sparse_memory_is_left_alone() -> None:
    libc = hugepages._Libc()
    dense_region, sparse_region = _private(8 * HUGE), _private(8 * HUGE)
    try:
        dense_start = -(-_address(dense_region) // HUGE) * HUGE
        sparse_start = -(-_address(sparse_region) // HUGE) * HUGE
        for offset in range(0, 8 * HUGE, SMALL):
            dense_region[offset] = 1  # every page resident
        for offset in range(0, 8 * HUGE, 64 * SMALL):
            sparse_region[offset] = 1  # one page in 64
        dense_runs = libc.dense(dense_start, dense_start + 6 * HUGE)
        assert dense_runs == [(dense_start, dense_start + 6 * HUGE)]  # merged into one run
        assert libc.dense(sparse_start, sparse_start + 6 * HUGE) == []
        sparse_before = _resident(libc, sparse_start, sparse_start + 6 * HUGE)

        result = collapse_heap()
        if result.refused:
            pytest.skip(
                f"this kernel refuses MADV_COLLAPSE ({os.strerror(result.refused)}); "
                "the service logs that once and carries on with small pages"
            )
        assert result.asked >= 6 * HUGE
        assert _huge_bytes() >= 6 * HUGE  # the kernel really moved memory
        # The sparse region did not become resident (collapsing it would have filled it).
        assert _resident(libc, sparse_start, sparse_start + 6 * HUGE) == sparse_before
        # The collapsed memory still holds what was written.
        assert all(dense_region[offset] == 1 for offset in range(0, 8 * HUGE, SMALL * 97))
        # A second pass finds the huge pages in place and asks again; asked once more, the
        # kernel collapses this region without fault. (Only this region: the rest of the
        # heap, which the test's process churns meanwhile, may fail a pass now and then.)
        again = collapse_heap()
        assert again.asked >= 6 * HUGE
        assert libc.collapse(dense_start, dense_start + 6 * HUGE) == 0
    finally:
        dense_region.close()
        sparse_region.close()


@linux_only
async def test_the_background_task_collapses_the_heap_and_can_be_turned_off() -> None:
    keep = [str(i) * 4 for i in range(300_000)]  # some heap to collapse
    task = HeapPages(True, seconds=0.05)
    await task.start()
    try:
        for _ in range(200):
            await asyncio.sleep(0.05)
            if task.collapsed or not task.enabled:
                break
    finally:
        await task.stop()
    if not task.enabled:
        pytest.skip("this kernel refuses MADV_COLLAPSE; the task logged it and stopped")
    assert task.collapsed >= HUGE
    assert len(keep) == 300_000

    off = HeapPages(False, seconds=0.05)
    await off.start()
    await asyncio.sleep(0.2)
    await off.stop()
    assert off.collapsed == 0


async def test_a_kernel_that_refuses_is_logged_once_and_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EINVAL before anything worked (no MADV_COLLAPSE, THP off): one log line, no more passes.
    After a pass that worked, a refusal is one mapping's: the task keeps going."""
    passes: list[Collapsed] = []

    def refusing() -> Collapsed:
        passes.append(Collapsed(asked=HUGE, failed=HUGE, refused=errno.EINVAL))
        return passes[-1]

    # Its own pass function: the session app's HeapPages, ticking meanwhile, is not counted.
    task = HeapPages(True, seconds=0.01, collapse=refusing)
    with caplog.at_level(logging.INFO, logger="keyplane.hugepages"):
        await task.start()
        await asyncio.sleep(0.2)
        await task.stop()
    assert len(passes) == 1 and not task.enabled
    assert [r.getMessage() for r in caplog.records] == [
        f"huge pages are not available here (MADV_COLLAPSE: {os.strerror(errno.EINVAL)})"
    ]

    worked = HeapPages(True, seconds=0.01, collapse=refusing)
    worked.collapsed = 8 * HUGE
    passes.clear()
    await worked.start()
    await asyncio.sleep(0.2)
    await worked.stop()
    assert len(passes) > 1 and worked.enabled


def test_the_setting_is_read_and_a_bad_value_is_named() -> None:
    assert Settings.from_env({}).huge_pages is True
    assert Settings.from_env({"KEYPLANE_HUGE_PAGES": "false"}).huge_pages is False
    with pytest.raises(SettingsError, match="KEYPLANE_HUGE_PAGES='maybe'"):
        Settings.from_env({"KEYPLANE_HUGE_PAGES": "maybe"})
