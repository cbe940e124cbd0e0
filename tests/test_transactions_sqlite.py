"""A transaction that cannot open the SQLite file leaves nothing taken (SQLite).

Tortoise 1.1's SQLite transaction context takes the connection's lock and only then (re)opens the
database file; when that fails it keeps the lock, and every later transaction waits for it for
good. `app.db.transaction` opens the file first, outside the lock. The fault is real: the
connection is closed and the file's path made unopenable (a path under a regular file).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.applications import Starlette
from tortoise import connections

from app.db import DATABASE_ERRORS, transaction
from tests.conftest import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "sqlite", reason="SQLite only: runs in the KEYPLANE_TEST_DATABASE=sqlite pass"
)


async def test_a_file_that_cannot_be_opened_fails_the_transaction_and_takes_nothing(
    app: Starlette, tmp_path: Path
) -> None:
    client = connections.get("default")
    path = client.filename  # type: ignore[attr-defined]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    await client.close()
    client.filename = str(blocker / "keyplane.sqlite3")  # type: ignore[attr-defined]
    try:
        for _ in range(2):  # the second one would wait for the lock if the first kept it
            with pytest.raises(DATABASE_ERRORS, match="unable to open database file"):
                async with asyncio.timeout(5):
                    async with transaction():
                        pass
    finally:
        client.filename = path  # type: ignore[attr-defined]
    async with asyncio.timeout(5), transaction() as connection:
        _, rows = await connection.execute_query("SELECT 1 AS one")
    assert [dict(row) for row in rows] == [{"one": 1}]
