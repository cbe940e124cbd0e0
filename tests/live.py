"""Live `keyplane serve` processes for tests that need a real port (browsers, gateways)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.pgserver import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def live_server(
    database_url: str, extra_env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> Iterator[str]:
    """Run `keyplane serve` on a free loopback port; yields its base URL, stops it after."""
    port = free_port()
    env = {**os.environ, "KEYPLANE_DATABASE_URL": database_url, **(extra_env or {})}
    # The server's output goes to a file: an unread pipe fills up and blocks the server.
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- outlives this block; closed in finally
        prefix="keyplane-live-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"keyplane serve exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(f"{base_url}/governance/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("keyplane serve did not become healthy in time")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)
