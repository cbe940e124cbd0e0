"""Server processes for the benchmark: start, wait until ready, measure, and always stop."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# `keyplane serve` runs uvicorn with these options (app/cli.py: cmd_serve); the baseline gets the
# same ones on the command line. Loop and HTTP parser are uvicorn's "auto": uvloop and httptools.
LOG_LEVEL = "warning"


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1/verify"


def verify_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        LOG_LEVEL,
    ]


def bare_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.bare:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        LOG_LEVEL,
        "--timeout-graceful-shutdown",
        "10",
    ]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def cpu_layout() -> tuple[set[int], set[int]] | None:
    """(the CPU every server under test runs on, the CPUs of everything else: the load
    generator, PostgreSQL, the bench itself), or None with fewer than two CPUs or BENCH_PIN=0.

    Every server gets the same CPU, so the targets compared in a round ran on the same core: on
    this shared two-vCPU machine the vCPUs may differ in speed for minutes at a time, and a
    server that stayed on the slower one would bias a whole run's ratios. Unpinned, two runs of
    one build gave 1M/1k 1.12 and 0.77 (1.17 and 0.77 per server CPU-s); pinned, two runs of it
    gave 0.83 and 0.94: steadier, though two runs each cannot prove it. PostgreSQL no longer
    shares the servers' CPU; it shares the other with wrk. (The 1M server's "idle" 5% of earlier
    runs was wrk's own start-up, see bench/verify.lua.)"""
    if os.environ.get("BENCH_PIN", "1").strip() == "0":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def _pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def serve(
    name: str,
    command: Sequence[str],
    port: int,
    env: dict[str, str],
    logdir: Path,
    cpus: set[int] | None = None,
) -> Iterator[Server]:
    """Run a server in its own process group (on `cpus` when given); it is stopped on exit,
    whatever happens."""
    log = logdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_pinned(cpus),
        )
    server = Server(name, process, port, log)
    try:
        deadline = time.monotonic() + 60
        while not _ready(server.url):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL it if it is still there after 15 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def taking_turns(servers: Sequence[Server], seconds: float) -> Iterator[None]:
    """The servers run one at a time, each for `seconds` in turn (SIGSTOP and SIGCONT to their
    process groups), until the block ends; then all of them run again, whatever happened."""
    stop_turns = threading.Event()

    def send(server: Server, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # one that exited: the others go on
            os.killpg(server.pid, signum)

    def turns() -> None:
        index = 0
        while not stop_turns.wait(seconds):
            send(servers[index], signal.SIGSTOP)
            index = (index + 1) % len(servers)
            send(servers[index], signal.SIGCONT)

    thread = threading.Thread(target=turns, name="taking-turns", daemon=True)
    try:
        for server in servers[1:]:
            send(server, signal.SIGSTOP)
        thread.start()
        yield
    finally:
        stop_turns.set()
        if thread.is_alive():
            thread.join()
        for server in servers:
            send(server, signal.SIGCONT)


# --- /proc measurements ---------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process tree now (VmRSS) and at its peak (VmHWM), in MiB."""
    pids = process_tree(pid)
    return {
        "rss_mib": sum(_status_kib(p, "VmRSS") for p in pids) / 1024,
        "peak_rss_mib": sum(_status_kib(p, "VmHWM") for p in pids) / 1024,
        "processes": len(pids),
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process tree so far, counting the children its members
    have already reaped (PostgreSQL backends come and go)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / ticks


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle, not waiting on I/O) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time of this process and its reaped children (wrk, once a run has finished)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
