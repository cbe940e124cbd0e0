"""Seeding: a workspace through the real CLI, then many keys straight into `api_keys` with
asyncpg's COPY. Tokens have the real shape and checksum (app.tokens); their random part comes
from a seeded generator so a run is reproducible, and their digest is app.tokens.hash_secret."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from app.tokens import (
    RANDOM_BITS,
    RANDOM_CHARS,
    TAG_BY_TYPE,
    KeyType,
    base62,
    checksum,
    display_prefix,
    hash_secret,
)

ROOT = Path(__file__).resolve().parent.parent
KEY_PREFIX = "bench"
PERMISSIONS = json.dumps(["pdf.generate", "template.read"], separators=(",", ":"))
CHUNK = 50_000
COLUMNS = (
    "public_id",
    "workspace_id",
    "environment_id",
    "name",
    "type",
    "secret_hash",
    "prefix",
    "status",
    "permissions",
    "allowed_ips",
    "created_at",
    "updated_at",
    "total_requests",
    "successful_requests",
    "failed_requests",
)


@dataclass(frozen=True)
class Workspace:
    pk: int
    public_id: str
    environment_pk: int


def migrate_and_bootstrap(database_url: str, name: str) -> Workspace:
    """`keyplane bootstrap` (which migrates first) through the CLI, as an operator would."""
    env = {**os.environ, "KEYPLANE_DATABASE_URL": database_url}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "bootstrap",
            "--workspace",
            name,
            "--plan",
            "SCALE_ENTERPRISE",
            "--key-prefix",
            KEY_PREFIX,
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    public_id = json.loads(out)["workspaceId"]
    return asyncio.run(_workspace(database_url, public_id))


async def _workspace(database_url: str, public_id: str) -> Workspace:
    connection = await asyncpg.connect(database_url)
    try:
        row = await connection.fetchrow(
            "SELECT w.id AS ws, e.id AS env FROM workspaces w JOIN environments e"
            " ON e.workspace_id = w.id WHERE w.public_id = $1 AND e.name = 'production'",
            public_id,
        )
    finally:
        await connection.close()
    assert row is not None
    return Workspace(pk=row["ws"], public_id=public_id, environment_pk=row["env"])


def _chunk_rows(
    start: int, count: int, workspace: Workspace, hot_every: int
) -> tuple[list[tuple[object, ...]], list[tuple[int, str]]]:
    """Rows for keys start..start+count-1, and the tokens of the hot ones (index % hot_every)."""
    rng = random.Random(f"keyplane-bench-{start}")
    tag = TAG_BY_TYPE[KeyType.SERVER]
    now = datetime.now(UTC)
    rows: list[tuple[object, ...]] = []
    hot: list[tuple[int, str]] = []
    for index in range(start, start + count):
        head = f"{KEY_PREFIX}_{tag}_{base62(rng.getrandbits(RANDOM_BITS), RANDOM_CHARS)}"
        token = head + checksum(head)
        rows.append(
            (
                f"key_{base62(rng.getrandbits(RANDOM_BITS), RANDOM_CHARS)}",
                workspace.pk,
                workspace.environment_pk,
                f"bench key {index}",
                "SERVER",
                hash_secret(token),
                display_prefix(token),
                "ENABLED",
                PERMISSIONS,
                "[]",
                now,
                now,
                0,
                0,
                0,
            )
        )
        if index % hot_every == 0:
            hot.append((index, token))
    return rows, hot


async def _copy(database_url: str, rows: list[tuple[object, ...]]) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.copy_records_to_table("api_keys", records=rows, columns=COLUMNS)
    finally:
        await connection.close()


def _seed_chunk(
    database_url: str, start: int, count: int, workspace: Workspace, hot_every: int
) -> list[tuple[int, str]]:
    rows, hot = _chunk_rows(start, count, workspace, hot_every)
    asyncio.run(_copy(database_url, rows))
    return hot


def seed_keys(database_url: str, workspace: Workspace, total: int, hot: int) -> list[str]:
    """Insert `total` ENABLED SERVER keys; return the tokens of `hot` of them, spread evenly."""
    hot_every = max(1, total // hot)
    starts = range(0, total, CHUNK)
    with ProcessPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
        futures = [
            pool.submit(_seed_chunk, database_url, s, min(CHUNK, total - s), workspace, hot_every)
            for s in starts
        ]
        pairs = [pair for future in futures for pair in future.result()]
    asyncio.run(_analyze(database_url))
    pairs.sort()
    return [token for _, token in pairs[:hot]]


async def _analyze(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("ANALYZE api_keys")
    finally:
        await connection.close()
