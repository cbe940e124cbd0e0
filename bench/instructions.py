"""`make bench-instructions`: instructions per verification, counted, not timed.

On the shared machines this is developed on, timed A/Bs resolve about a percent, and they have
no hardware counters. Valgrind's callgrind counts the instructions a piece of code executes, the
same from run to run whatever the neighbours do, and simulates the caches (`--cache-sim`), which
shows how many of the memory reads miss. It runs code about fifty times slower, so this measures
the verify endpoint in process (no uvicorn, no socket), over cached keys, in a child process
under callgrind:

- `verify H`: /v1/verify for H keys in the cache (filled in batches of 14, verified as the bench's
  warm-up does: once to fill, once more for the activity memo), then `MEASURED` verifications
  cycling over them, with the usage flush's own Python work (taking the tallies and encoding the
  rows; no database) every `FLUSH_EVERY` verifications, as in a server doing 7,000 a second.
  Printed: instructions and simulated cache misses per verification, for 1,000 and for 100,000
  keys. What differs is what the 1M bench pays per verification for its number of keys, less
  what happens outside the endpoint (uvicorn, the kernel, PostgreSQL).
- `flush K`: the flush's Python work per key row, K keys counted once each, then taken.

Only the measured part is counted: it runs inside `functools.reduce`, and callgrind collects
only within that C function (`--toggle-collect`). Nothing else in the child calls it.

The three cases run at once, one valgrind each; the 100,000-key case takes about 30 minutes
(the fill and two passes before the measured part run under valgrind too).

`timed` (`make bench-timed`, about a minute): the `verify` case timed, not counted, without
valgrind, each request's scope and token made for it as a server's are. Counts miss what the
timed difference is mostly made of: reading a key's objects, scattered over the heap, from
memory (2026-11-28, `2be40e9`: 9.4 against 13.4 us a verification, 1,000 against 100,000 keys,
where the instructions differ by 10%).

Settings (environment): BENCH_INSTR_HOT (100000), BENCH_INSTR_MEASURED (28000).
"""

from __future__ import annotations

import functools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLUSH_EVERY = 7000
FILL_BATCH = 14  # keys per fill query, as the bench's warm-up gets them (README)
TIMED_PAIRS = 3  # `timed`: runs of each case, alternating
TIMED_ROUNDS = 15  # `timed`: timed passes of the measured part per run
_CHILD_ENV = {
    "KEYPLANE_DATABASE_URL": "postgres://bench:unused@127.0.0.1:1/none",
    "KEYPLANE_CACHE_REFRESH_SECONDS": "1000000",  # no entry goes stale during the run
}
EVENTS = ("Ir", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")


def _drive(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits for anything but a bare yield (`asyncio.sleep(0)`)."""
    try:
        while True:
            coroutine.send(None)
    except StopIteration as done:
        return done.value


def _measured(work: Callable[[], None]) -> None:
    """Run `work` inside functools.reduce: what callgrind counts (`--toggle-collect`)."""
    functools.reduce(lambda _a, _b: work(), [0, 0])


def _row(index: int) -> dict[str, Any]:
    """A key row as the cache's query returns it, shaped like the bench's seeded keys."""
    return {
        "public_id": f"key_{index:022d}",
        "id": index + 1,
        "type": "SERVER",
        "workspace_id": 1,
        "ws": "ws_bench",
        "environment_id": 1,
        "env": "env_bench",
        "status": "ENABLED",
        "permissions": '["pdf.generate","template.read"]',
        "role": None,
        "allowed_ips": "[]",
        "authorized_origins": None,
        "expires_at": None,
        "grace_ends_at": None,
    }


def _child_verify(hot: int, measured: int, timed_rounds: int = 0) -> None:
    """The `verify` case; with `timed_rounds`, the measured part is timed that many times (no
    valgrind) and the median printed, each request's scope made afresh as a server's is."""
    from app import usage as usage_module
    from app.activity import ActivityRecorder
    from app.cache import KeyCache, record_from_row
    from app.clock import SystemClock
    from app.gcpolicy import GcPolicy
    from app.http.verify import VerifyEndpoint
    from app.metrics import Metrics
    from app.settings import Settings
    from app.tokens import KeyType, hash_secret, mint_token

    usage_module.FLUSH_SLICE_PAUSE = 0  # a bare yield, which `_drive` steps over
    settings = Settings.from_env()
    clock = SystemClock()
    cache = KeyCache(settings)
    activity = ActivityRecorder(settings, clock)
    usage = usage_module.UsageRecorder(settings, clock)
    endpoint = VerifyEndpoint(settings, cache, clock, activity, usage, Metrics())
    tokens = [mint_token("bench", KeyType.SERVER) for _ in range(hot)]
    scopes = [
        {
            "type": "http",
            "method": "GET",
            "path": "/v1/verify",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"x-api-key", token.encode())],
            "client": ("127.0.0.1", 40000),
        }
        for token in tokens
    ]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        return None

    bucket_ids = iter(range(10**9, 2 * 10**9))

    def flush() -> None:
        """The PostgreSQL flush's Python part, and what its commit teaches: each new row's ID
        (on the tallies) and each first sighting written (the activity recorder's memo)."""
        dirty, usage._dirty = usage._dirty, []
        taken = usage_module._Taken(usage._hour(clock.now()), 1)
        _drive(usage._take(dirty, usage_module._Buffers(), taken))
        taken.known.statements()
        taken.new.statements()
        for key in taken.new.keys:
            key.tally.bucket_id, key.tally.bucket_hour = next(bucket_ids), taken.hour
        for (key_id, ip), seen in activity._ips.items():
            activity._stored_ips[(key_id, ip)] = seen.last
        activity._ips = {}

    done = 0
    afresh = False  # timed: each request's scope and token made for it (`verify`)
    template = {name: value for name, value in scopes[0].items() if name != "headers"}
    token_bytes = [token.encode() for token in tokens] if timed_rounds else []

    def verify(index: int) -> None:
        nonlocal done
        if afresh:  # as in a server: new, and in the CPU's caches (not one more object per key)
            token = bytes(bytearray(token_bytes[index]))  # a copy, as read off a socket
            headers = [(b"host", b"127.0.0.1:8000"), (b"x-api-key", token)]
            scope = {**template, "headers": headers}
        else:
            scope = scopes[index]
        _drive(endpoint(scope, receive, send))
        done += 1
        if done % FLUSH_EVERY == 0:
            flush()

    order = list(range(hot))
    random.Random(1).shuffle(order)
    now = 0.0
    for start in range(0, hot, FILL_BATCH):
        batch = order[start : start + FILL_BATCH]
        for index in batch:
            cache._store(hash_secret(tokens[index]), record_from_row(_row(index)), index, now)
        for index in batch:
            verify(index)
    flush()
    for index in range(hot):  # the second pass: each key's activity memo
        verify(index)
    GcPolicy(10.0).tick()  # as the server does every 10 s: the survivors frozen
    position = random.Random(2).randrange(hot)

    def run() -> None:
        nonlocal position
        for _ in range(measured):
            position = (position + 1) % hot
            verify(position)

    hits = cache.hits
    times = []
    if timed_rounds:
        afresh = True
        for _ in range(timed_rounds):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) / measured * 1e6)
    else:
        _measured(run)
    assert cache.misses == 0, "every measured verification must be a cache hit"
    if timed_rounds:
        print(f"{hot} keys: {statistics.median(times):.2f} us a verification")
    else:
        print(f"measured {measured} verifications: {cache.hits - hits} cache hits")


def _child_flush(keys: int, rounds: int) -> None:
    from app import usage as usage_module
    from app.cache import record_from_row
    from app.clock import ManualClock
    from app.settings import Settings

    usage_module.FLUSH_SLICE_PAUSE = 0
    clock = ManualClock(datetime(2026, 1, 1, 3, 10, tzinfo=UTC))
    usage = usage_module.UsageRecorder(Settings.from_env(), clock)
    records = [record_from_row(_row(index)) for index in range(keys)]

    by_id = upserted = 0

    def one(learn: bool) -> Callable[[], None]:
        for index, record in enumerate(records):
            clock.advance(microseconds=37)
            usage._count(record, clock.now(), index % 10 != 0)
        dirty, usage._dirty = usage._dirty, []
        taken = usage_module._Taken(usage._hour(clock.now()), 1)

        def take() -> None:
            nonlocal by_id, upserted
            _drive(usage._take(dirty, usage_module._Buffers(), taken))
            taken.known.statements()
            taken.new.statements()
            by_id += len(taken.known.keys)
            upserted += len(taken.new.keys)

        if learn:
            take()
            for n, key in enumerate(taken.new.keys):
                key.tally.bucket_id, key.tally.bucket_hour = 10**9 + n, taken.hour
        return take

    one(True)  # every key's bucket row learned: the flushes below update by row ID
    by_id = upserted = 0
    for _ in range(rounds):
        _measured(one(False))
    print(f"flushed {rounds} times: {by_id} rows by row ID, {upserted} upserted")


def _callgrind(args: list[str], workdir: Path, name: str) -> dict[str, int]:
    """Run this module's child mode `args` under callgrind; the events it collected."""
    out = workdir / f"{name}.callgrind"
    env = {**os.environ, "PYTHONHASHSEED": "0", **_CHILD_ENV}
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--cache-sim=yes",
            "--collect-atstart=no",
            "--toggle-collect=functools_reduce",
            f"--callgrind-out-file={out}",
            *_child_command(args),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    text = out.read_text()
    events = re.search(r"^events: (.*)$", text, re.M)
    totals = re.search(r"^summary: (.*)$", text, re.M) or re.search(r"^totals: (.*)$", text, re.M)
    assert events and totals, f"no totals in {out}"
    return dict(zip(events.group(1).split(), map(int, totals.group(1).split()), strict=False))


def main() -> int:
    hot = int(os.environ.get("BENCH_INSTR_HOT", "100000"))
    measured = int(os.environ.get("BENCH_INSTR_MEASURED", "28000"))
    with tempfile.TemporaryDirectory(prefix="keyplane-instr-") as tmp:
        workdir = Path(tmp)
        cases = {
            "verify, 1,000 keys": (["verify", "1000", str(measured)], measured),
            f"verify, {hot:,} keys": (["verify", str(hot), str(measured)], measured),
            "flush, per key row": (["flush", "7000", "4"], 4 * 7000),
        }
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            futures = {
                name: pool.submit(_callgrind, args, workdir, f"case{i}")
                for i, (name, (args, _)) in enumerate(cases.items())
            }
            counted = {name: future.result() for name, future in futures.items()}
    print(f"{'per verification / key row':28}" + "".join(f"{e:>10}" for e in EVENTS))
    for name, (_, units) in cases.items():
        row = counted[name]
        print(f"{name:28}" + "".join(f"{row.get(e, 0) / units:>10.1f}" for e in EVENTS))
    small, large = (counted[name]["Ir"] / measured for name in list(cases)[:2])
    print(f"instructions per verification, {hot:,} keys / 1,000 keys: {large / small:.3f}")
    return 0


def _child_command(args: list[str] | tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "bench.instructions", *args]


def child(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of this module's child modes without valgrind; its output as text."""
    return subprocess.run(
        _child_command(args),
        cwd=ROOT,
        env={**os.environ, **_CHILD_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def timed() -> int:
    """`make bench-timed`: the `verify` case timed instead of counted, no valgrind. The 1,000-key
    and the large case run one after the other, TIMED_PAIRS times, each in a new process;
    printed: each run's median time per verification and the ratio of the medians."""
    hot = int(os.environ.get("BENCH_INSTR_HOT", "100000"))
    measured = int(os.environ.get("BENCH_INSTR_MEASURED", "28000"))
    figures: list[tuple[int, list[float]]] = [(1000, []), (hot, [])]
    for _ in range(TIMED_PAIRS):
        for keys, times in figures:
            done = child("verify", str(keys), str(measured), str(TIMED_ROUNDS))
            assert done.returncode == 0, done.stderr
            print(done.stdout.strip(), flush=True)
            times.append(float(done.stdout.split(":")[1].split()[0]))
    small, large = (statistics.median(times) for _, times in figures)
    print(
        f"median us a verification: 1,000 keys {small:.2f}, {hot:,} keys {large:.2f} "
        f"(+{large - small:.2f} us, {large / small:.3f}x)"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "verify":
        _child_verify(
            int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0
        )
    elif len(sys.argv) > 1 and sys.argv[1] == "timed":
        sys.exit(timed())
    elif len(sys.argv) > 1 and sys.argv[1] == "flush":
        _child_flush(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
