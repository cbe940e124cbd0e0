"""A throwaway PostgreSQL 15 server for the test suite, started from the machine's binaries.

PostgreSQL refuses to run as root, so as root the binaries run through `runuser -u postgres`.
Data and socket live in one temp dir; the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found (install postgresql-15)")
    return candidates[-1]


# Ports already handed out by this process: a server may not have bound its port yet.
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ephemeral ports: the ports it gives outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port that is free now, for a server the caller starts next.

    It is picked below the kernel's ephemeral range, so an outgoing connection made before the
    server binds it (this test's own, or PostgreSQL's) cannot take it, as one can a port that
    `bind(("127.0.0.1", 0))` picked; and it is never handed out twice by this process."""
    low, _ = ephemeral_range()
    start = max(10000, low - 10000)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(start, low) if start < low else 0
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port found in {start}-{low - 1}")


class PostgresServer:
    """Start, stop and restart a private PostgreSQL server (fault tests stop it on purpose)."""

    def __init__(self, settings: str = "") -> None:
        self.settings = settings  # extra `-c name=value` options for the server
        self.dir = Path(tempfile.mkdtemp(prefix="keyplane-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(self.dir, 0o700)

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run(
            _bin("initdb"), "-D", str(self.data), "--auth=trust", "--no-sync", "-U", "postgres"
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            + self.settings
        )
        self._run(
            _bin("pg_ctl"),
            "-D",
            str(self.data),
            "-w",
            "-l",
            str(self.dir / "log"),
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def create_database(self, name: str) -> None:
        self._run(_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
