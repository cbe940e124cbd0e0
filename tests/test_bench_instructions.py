"""`make bench-instructions` counts what its child modes run (bench/instructions.py). They reach
into the usage recorder's and the key cache's private parts, so a change there can break them
without failing anything else: run both, small and without valgrind, and check that they
measured what they say (every verification a cache hit; every flushed row by row ID), and that
the timed case prints the figure `make bench-timed` reads."""

from __future__ import annotations

from bench.instructions import child


def _child(*args: str) -> str:
    done = child(*args, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_verify_case_measures_cache_hits_only() -> None:
    assert _child("verify", "300", "1000") == "measured 1000 verifications: 1000 cache hits"


def test_the_flush_case_measures_updates_by_row_id() -> None:
    assert _child("flush", "500", "2") == "flushed 2 times: 1000 rows by row ID, 0 upserted"


def test_the_timed_verify_case_prints_its_median_time() -> None:
    """`make bench-timed` reads the figure after the colon of this line."""
    shown = _child("verify", "300", "1000", "2")
    name, figure = shown.split(":")
    assert name == "300 keys" and figure.endswith(" us a verification")
    assert float(figure.split()[0]) > 0
