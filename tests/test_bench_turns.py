"""`make bench` reads its 1M/1k check from two servers taking turns on one core
(`bench.procs.taking_turns`: SIGSTOP and SIGCONT to their process groups). A server left stopped
would hang the benchmark and every later run on the machine, so: each takes turns while the block
runs, and all of them run again when it ends, whether it ends normally or by an exception."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procs


def _state(pid: int) -> str:
    """The process's state letter (`T`: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def servers() -> Iterator[list[procs.Server]]:
    started = [
        procs.Server(name, subprocess.Popen(["sleep", "60"], start_new_session=True), 0, Path())
        for name in ("first", "second")
    ]
    yield started
    for server in started:
        procs.stop(server.process)


def _watch(servers: list[procs.Server], seconds: float) -> list[set[str]]:
    """The states each server was seen in over `seconds`."""
    seen: list[set[str]] = [set() for _ in servers]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for states, server in zip(seen, servers, strict=True):
            states.add(_state(server.pid))
        time.sleep(0.002)
    return seen


def test_servers_take_turns_and_all_run_again_after(servers: list[procs.Server]) -> None:
    first, second = servers
    with procs.taking_turns(servers, 0.05):
        assert _state(second.pid) == "T"  # only the first runs to begin with
        seen = _watch(servers, 0.6)
    for states in seen:
        assert "T" in states and states - {"T"}, states  # each was stopped and ran, in turn
    time.sleep(0.05)
    assert _state(first.pid) != "T" and _state(second.pid) != "T"


def test_all_run_again_when_the_block_fails(servers: list[procs.Server]) -> None:
    with pytest.raises(RuntimeError), procs.taking_turns(servers, 0.05):
        time.sleep(0.12)
        raise RuntimeError("the load generator failed")
    time.sleep(0.05)
    assert [_state(s.pid) != "T" for s in servers] == [True, True]
