"""app.background.Periodic: the cadence of the background loops (usage and activity flushes,
the key-cache refresh, the GC policy)."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

from app.background import Periodic


async def test_a_slow_tick_does_not_push_the_next_ones_back() -> None:
    """Each tick starts a period after the previous one started, not a period after it ended:
    a usage flush that takes most of its interval under load is still followed by the next
    one on time, which keeps counts visible within the promised bound."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def tick() -> None:
        starts.append(loop.time())
        await asyncio.sleep(0.3)  # a tick taking 60% of the period

    periodic = Periodic(0.5, tick)
    periodic.start()
    while len(starts) < 4:
        await asyncio.sleep(0.05)
    await periodic.stop()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Started a period apart (0.5 s), not a period plus the tick (0.8 s).
    assert all(0.45 <= gap < 0.7 for gap in gaps), gaps


async def test_a_tick_longer_than_the_period_is_followed_at_once_without_a_backlog() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def tick() -> None:
        starts.append(loop.time())
        await asyncio.sleep(0.5 if len(starts) == 1 else 0)  # the first is two periods long

    periodic = Periodic(0.25, tick)
    periodic.start()
    while len(starts) < 3:
        await asyncio.sleep(0.05)
    await periodic.stop()
    first, second, third = starts[:3]
    assert 0.45 <= second - first < 0.65  # right after the slow one ended
    assert 0.2 <= third - second < 0.4  # then a period again: missed ticks are not made up


async def test_jittered_periods_vary_within_their_bounds() -> None:
    """The key-cache refresh is jittered, so processes started together spread their bulk
    reads over the period instead of all reading at the same instant. The periods drawn are
    checked, and that each tick waited for them (a tick woken late shortens the next gap, so
    the gaps themselves have no lower bound worth asserting)."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    periods: list[float] = []

    class Noted(Periodic):
        def _period(self) -> float:
            periods.append(super()._period())
            return periods[-1]

    async def tick() -> None:
        starts.append(loop.time())

    periodic = Noted(0.1, tick, jitter=0.5)
    begun = loop.time()
    periodic.start()
    while len(starts) < 12:
        await asyncio.sleep(0.02)
    await periodic.stop()
    assert all(0.05 <= period <= 0.15 for period in periods), periods
    assert max(periods) - min(periods) > 0.02, periods  # not one fixed period
    # Tick n starts no sooner than the first n + 1 periods after the start (1 ms: the loop's
    # timers may fire a clock resolution early).
    for n, started in enumerate(starts[:12]):
        assert started >= begun + sum(periods[: n + 1]) - 0.001, (n, starts, periods)


async def test_a_tick_that_raises_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a tick (an error that is not the database's) neither ends the loop nor makes
    `stop` raise: a usage recorder's shutdown flush, which runs after `stop`, still runs."""
    ticks = 0
    quoted = "".join(reversed("e5b0"))  # made at run time: it appears in no source line

    async def tick() -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 1:
            raise KeyError(quoted)  # a message quoting a value (a token hash, say)

    periodic = Periodic(0.02, tick)
    with caplog.at_level(logging.ERROR, logger="keyplane.background"):
        periodic.start()
        for _ in range(300):
            if ticks >= 3:
                break
            await asyncio.sleep(0.01)
        await periodic.stop()  # does not raise
    assert ticks >= 3
    [record] = caplog.records
    first, *stack = record.getMessage().splitlines()
    assert first == f"{tick.__qualname__} failed; it runs again next period (KeyError)"
    assert any("test_background.py" in line for line in stack)  # where it was raised
    assert quoted not in caplog.text and record.exc_info is None
