"""Load generators: wrk (closed loop, full load), and a small asyncio HTTP/1.1 client for what wrk
cannot do here: an open-loop fixed-rate run (wrk2 is not packaged in Debian), warming a cache
with each token exactly once, and a closed-loop fallback when wrk cannot be installed."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LUA_SCRIPT = Path(__file__).with_name("verify.lua")


@dataclass(frozen=True)
class LoadResult:
    """One measured run: throughput and latency in milliseconds."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # connection errors, timeouts and non-2xx answers
    tool: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def ensure_wrk() -> str | None:
    """The path of wrk, installing Debian's package once if needed; None when it cannot be had."""
    found = shutil.which("wrk")
    if found:
        return found
    print("bench: wrk not found; installing Debian's package (apt-get)", flush=True)
    try:
        if os.geteuid() != 0:
            raise PermissionError("apt-get needs root")
        subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "wrk"],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"bench: could not install wrk: {exc}", file=sys.stderr, flush=True)
        return None
    return shutil.which("wrk")


def run_wrk(
    wrk: str,
    url: str,
    tokens_file: Path,
    *,
    threads: int,
    connections: int,
    seconds: float,
    rate: float | None = None,
) -> LoadResult:
    """One closed-loop wrk run cycling through the tokens in `tokens_file`; with `rate`, each
    connection pauses between requests so that the total stays near `rate` per second."""
    env = {**os.environ, "BENCH_TOKENS": str(tokens_file), "BENCH_THREADS": str(threads)}
    if rate is not None:
        env["BENCH_DELAY_MS"] = f"{connections / rate * 1000:.3f}"
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no BENCH_JSON line:\n{out}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    duration = data["duration_us"] / 1e6
    errors = sum(data[k] for k in data if k.startswith("errors_"))
    return LoadResult(
        requests=data["requests"],
        seconds=duration,
        rps=data["requests"] / duration,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        tool="wrk" if rate is None else "wrk-paced",
    )


# --- the asyncio client -------------------------------------------------------------------------


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends GET /v1/verify with an X-API-Key."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, path: str, token: str) -> int:
        if self.writer is None or self.reader is None:
            await self.connect()
        assert self.writer is not None and self.reader is not None
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nX-API-Key: {token}\r\n\r\n"
        self.writer.write(request.encode("ascii"))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = self.reader = None


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def _send_each_once(
    host: str, port: int, path: str, tokens: Sequence[str], concurrency: int, deadline: float
) -> tuple[int, int]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for token in tokens:
        queue.put_nowait(token)
    errors = 0
    sent = 0

    async def worker() -> None:
        nonlocal errors, sent
        connection = _Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                try:
                    token = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sent += 1
                try:
                    if await connection.request(path, token) != 200:
                        errors += 1
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    connection.close()
        finally:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent, errors


def warm_up(
    host: str, port: int, tokens: Sequence[str], *, max_seconds: float, concurrency: int = 32
) -> tuple[int, float]:
    """Verify each token once (fills the server's key cache), stopping after `max_seconds`;
    returns how many were sent and the seconds it took."""
    started = time.perf_counter()
    coro = _send_each_once(host, port, "/v1/verify", tokens, concurrency, started + max_seconds)
    sent, errors = _run(coro)
    if errors:
        raise RuntimeError(f"warm-up: {errors} of {sent} verifications were not 200")
    return sent, time.perf_counter() - started


async def _open_loop(
    host: str, port: int, tokens: Sequence[str], rate: float, seconds: float, connections: int
) -> LoadResult:
    """Requests scheduled at a fixed rate whatever the answers do (like wrk2): each latency runs
    from the scheduled start, so a stalled server is not hidden by the client waiting for it."""
    idle: asyncio.Queue[_Connection] = asyncio.Queue()
    pool = [_Connection(host, port) for _ in range(connections)]
    # Connect first (and exercise each connection once) so set-up is not counted as latency.
    await asyncio.gather(*(c.connect() for c in pool))
    await asyncio.gather(
        *(c.request("/v1/verify", tokens[i % len(tokens)]) for i, c in enumerate(pool))
    )
    for connection in pool:
        idle.put_nowait(connection)
    latencies: list[float] = []
    errors = 0
    total = int(rate * seconds)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, token: str) -> None:
        nonlocal errors
        connection = await idle.get()
        try:
            status = await connection.request("/v1/verify", token)
            if status != 200:
                errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            connection.close()
        latencies.append(time.perf_counter() - scheduled)
        idle.put_nowait(connection)

    gc.collect()
    gc.disable()  # the client's own collector pauses would show as server latency
    try:
        started = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - started) * rate) + 1)
            while sent < due:
                scheduled = started + sent / rate
                task = asyncio.create_task(one(scheduled, tokens[sent % len(tokens)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            await asyncio.sleep(0.0005)
        if in_flight:
            await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    for connection in pool:
        connection.close()
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        errors=errors,
        tool="asyncio-open-loop",
    )


def fixed_rate(
    host: str,
    port: int,
    tokens: Sequence[str],
    *,
    rate: float,
    seconds: float,
    connections: int = 64,
) -> LoadResult:
    """An open-loop run at `rate` requests per second for `seconds`."""
    return _run(_open_loop(host, port, tokens, rate, seconds, connections))


async def _closed_loop(
    host: str, port: int, tokens: Sequence[str], seconds: float, connections: int
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    counter = 0

    async def worker(offset: int) -> None:
        nonlocal errors, counter
        connection = _Connection(host, port)
        position = offset
        try:
            while time.perf_counter() < deadline:
                position = (position + 1) % len(tokens)
                began = time.perf_counter()
                try:
                    if await connection.request("/v1/verify", tokens[position]) != 200:
                        errors += 1
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    connection.close()
                latencies.append(time.perf_counter() - began)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i * len(tokens) // connections) for i in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        errors=errors,
        tool="asyncio-closed-loop (FALLBACK: wrk unavailable; the client limits the figures)",
    )


def closed_loop(
    host: str, port: int, tokens: Sequence[str], *, seconds: float, connections: int
) -> LoadResult:
    """The fallback full-load run when wrk is unavailable: much weaker than wrk (Python client
    on the same two cores), so its absolute figures understate the server."""
    return _run(_closed_loop(host, port, tokens, seconds, connections))


def median_result(results: Sequence[LoadResult]) -> dict[str, object]:
    """Medians of each figure over repeated runs, and the runs themselves."""
    return {
        "rps": statistics.median(r.rps for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "errors": sum(r.errors for r in results),
        "tool": results[0].tool,
        "runs": [r.as_dict() for r in results],
    }


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on uvloop when available (what uvicorn uses too)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
