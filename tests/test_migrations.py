"""Upgrading a database that already holds data: every migration applies on top of the last
one's rows (on SQLite, ALTER TABLE cannot add a NOT NULL column without a default).

The migrations run in a subprocess (they initialise Tortoise's global connections, which the
session's app is using), against a database of the test's own."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import BACKEND
from tests.pgserver import PostgresServer
from tests.support import own_database

ROOT = Path(__file__).resolve().parent.parent
OLD_BUCKET = (
    "INSERT INTO usage_buckets (workspace_id, environment_id, key_id, bucket_start, "
    "total_requests, successful_requests, failed_requests) "
    "VALUES (1, 1, 'key_old', '2026-11-26 09:00:00+00:00', 5, 4, 1)"
)
NEW_BUCKET = OLD_BUCKET.replace("key_old", "key_new")


def migrate(url: str, target: str | None = None) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio
        from tortoise import Tortoise
        from tortoise.migrations.api.migrate import migrate
        from app.db import tortoise_config

        async def main():
            try:
                await migrate(config=tortoise_config({url!r}), target={target!r})
            finally:
                await Tortoise.close_connections()

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_usage_rollup_migration_upgrades_a_database_with_buckets(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    url = _upgraded(tmp_path, pg_server, "upgrade", "keyplane.0003_invitations", OLD_BUCKET)
    run(url, NEW_BUCKET)  # a writer that does not know the column gets a pending bucket
    rows = run(url, "SELECT key_id, rolled, last_used_at FROM usage_buckets ORDER BY key_id")
    # Buckets written before the upgrade were already in the keys' counters: rolled.
    assert [(k, bool(r), u) for k, r, u in rows] == [
        ("key_new", False, None),
        ("key_old", True, None),
    ]


def test_bucket_writers_migration_keeps_every_row_and_indexes(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    rolled_bucket = OLD_BUCKET.replace("(workspace_id", "(rolled, workspace_id").replace(
        "VALUES (", "VALUES (TRUE, "
    )
    url = _upgraded(
        tmp_path, pg_server, "writers", "keyplane.0004_usage_rollup", rolled_bucket, NEW_BUCKET
    )
    rows = run(
        url, "SELECT key_id, rolled, writer, total_requests FROM usage_buckets ORDER BY key_id"
    )
    assert [(k, bool(r), w, t) for k, r, w, t in rows] == [
        ("key_new", False, 0, 5),
        ("key_old", True, 0, 5),
    ]
    # One row per (key, hour, writer): another process's row for the same hour is its own...
    run(
        url,
        NEW_BUCKET.replace("failed_requests)", "failed_requests, writer)").replace(
            ", 1)", ", 1, 7)"
        ),
    )
    assert run(url, "SELECT count(*) FROM usage_buckets WHERE key_id = 'key_new'") == [(2,)]
    # ...and the same writer's second row is refused.
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        run(url, NEW_BUCKET)
    # The pending-bucket index survived (SQLite rebuilds the table to change its UNIQUE).
    if url.startswith("sqlite://"):
        indexes = run(url, "SELECT name FROM sqlite_master WHERE tbl_name = 'usage_buckets'")
    else:
        indexes = run(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_buckets'")
    assert ("idx_usage_buckets_unrolled",) in indexes


@pytest.mark.skipif(BACKEND != "postgres", reason="a fill factor is PostgreSQL's (SQLite has none)")
def test_bucket_pages_are_left_half_free_for_in_place_updates(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    url = _upgraded(tmp_path, pg_server, "fillfactor", "keyplane.0005_bucket_writers", OLD_BUCKET)
    options = "SELECT reloptions FROM pg_class WHERE relname = 'usage_buckets'"
    assert run(url, options) == [(["fillfactor=50"],)]
    assert run(url, "SELECT count(*) FROM usage_buckets") == [(1,)]
    migrate(url, "keyplane.0005_bucket_writers")  # and back
    assert run(url, options) == [(None,)]


def _upgraded(
    tmp_path: Path, pg_server: PostgresServer | None, name: str, start: str, *rows: str
) -> str:
    """A database of the test's own, migrated to `start`, given `rows`, then upgraded."""
    url = own_database(tmp_path, pg_server, name)
    migrate(url, start)
    for row in rows:
        run(url, row)
    migrate(url)
    return url


def run(url: str, sql: str) -> list[tuple[object, ...]]:
    if url.startswith("sqlite://"):
        with sqlite3.connect(url.removeprefix("sqlite://")) as db:
            return [tuple(r) for r in db.execute(sql).fetchall()]

    async def on_postgres() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(url.replace("postgres://", "postgresql://", 1))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(on_postgres())


def test_member_email_migration_names_emails_shared_across_workspaces(
    tmp_path: Path, pg_server: PostgresServer | None
) -> None:
    """0009 makes an email one member's; a database where a race already put one email into
    two workspaces is refused with the email named, and upgrades once one of them is gone."""
    url = own_database(tmp_path, pg_server, "emails")
    migrate(url, "keyplane.0008_token_creators")
    for n in (1, 2):
        run(
            url,
            "INSERT INTO workspaces (id, public_id, name, plan, key_prefix, created_at) "
            f"VALUES ({n}, 'ws_{n}', 'w{n}', 'GROWTH', 'kp', '2026-11-29 00:00:00+00:00')",
        )
        run(
            url,
            "INSERT INTO members (public_id, workspace_id, email, role, created_at) "
            f"VALUES ('mem_{n}', {n}, 'both@example.com', 'VIEWER', "
            "'2026-11-29 00:00:00+00:00')",
        )
    with pytest.raises(AssertionError, match=r"both@example\.com"):
        migrate(url)
    run(url, "DELETE FROM members WHERE public_id = 'mem_2'")
    migrate(url)
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        run(
            url,
            "INSERT INTO members (public_id, workspace_id, email, role, created_at) "
            "VALUES ('mem_3', 2, 'both@example.com', 'VIEWER', '2026-11-29 00:00:00+00:00')",
        )
    assert run(url, "SELECT public_id FROM members") == [("mem_1",)]
