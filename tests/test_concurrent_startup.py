"""Several hosts starting at once against one fresh database: each container runs `keyplane
migrate` (and `make run`'s bootstrap-default) at start-up, at the same moment. Every one must
succeed, and the database must end up as one run would leave it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.pgserver import PostgresServer
from tests.support import own_database

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4


def _at_once(url: str, *command: str) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "KEYPLANE_DATABASE_URL": url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_migrate_from_several_processes_at_once(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    url = own_database(tmp_path, pg_server, "startup_migrate")
    for run in _at_once(url, "migrate"):
        assert run.returncode == 0, run.stderr[-3000:]


def test_bootstrap_default_from_several_processes_at_once(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    url = own_database(tmp_path, pg_server, "startup_bootstrap")
    # Migrated already, so that all of them reach the workspace's creation at once.
    migrated = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=ROOT,
        env={**os.environ, "KEYPLANE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    runs = _at_once(url, "bootstrap-default")
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    # One of them created the workspace and showed its token; the others found it.
    created = [run for run in runs if "Created workspace" in run.stdout]
    assert len(created) == 1, [run.stdout for run in runs]
