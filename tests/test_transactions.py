"""A transaction whose BEGIN fails gives its connection back (PostgreSQL).

Tortoise 1.1's pooled transaction context acquires a connection, points the task's connection
context at the transaction, and only then sends BEGIN; when BEGIN fails (the server dropped
that connection meanwhile: a restart, an idle timeout, an operator's pg_terminate_backend), it
neither releases the connection nor resets the context. The pool then has one connection fewer
for good, and every later transaction in the same task (the usage flush's loop, say) nests in
the dead one and fails too. `app.db.transaction` cleans up after it.

The fault is real: the next connection the pool hands out has its server backend terminated
(by another connection) before BEGIN is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from starlette.applications import Starlette
from tortoise import connections

from app.db import DATABASE_ERRORS, transaction
from app.usage import UsageRecorder
from tests.support import WorkspaceHandle, flushes_stopped, verify
from tests.test_usage import key_usage

pytestmark = pytest.mark.postgres_only


class _KillingPool:
    """The service's asyncpg pool, except that each connection it hands out has its server
    backend terminated (through a connection of its own) before it is returned."""

    def __init__(self, pool: Any, database_url: str) -> None:
        self.pool = pool
        self.database_url = database_url
        self.killed: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        connection = await self.pool.acquire(*args, **kwargs)
        pid = connection.get_server_pid()
        admin = await asyncpg.connect(self.database_url)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        self.killed.append(pid)
        return connection


@asynccontextmanager
async def _connections_killed(app: Starlette) -> AsyncIterator[_KillingPool]:
    """While inside: each connection the service's pool hands out is killed first."""
    client = connections.get("default")
    await client.execute_query("SELECT 1")  # the pool is created on first use
    pool = client._pool
    assert pool is not None
    client._pool = killing = _KillingPool(pool, app.state.settings.database_url)
    try:
        yield killing
    finally:
        client._pool = pool


def _in_use(pool: Any) -> int:
    return int(pool.get_size() - pool.get_idle_size())


async def test_a_transaction_whose_begin_fails_releases_its_connection_and_context(
    app: Starlette,
) -> None:
    async with _connections_killed(app) as killing:
        with pytest.raises(DATABASE_ERRORS):
            async with transaction() as conn:
                await conn.execute_query("SELECT 1")
    assert killing.killed, "the fault was not injected"
    pool = killing.pool

    # The same task runs transactions again: its connection context was reset.
    async with transaction() as conn:
        _, rows = await conn.execute_query("SELECT 1 AS one")
    assert [dict(r) for r in rows] == [{"one": 1}]

    # And the pool got the connection back: at some moment nothing is in use (the service's
    # background flushes borrow one for a few milliseconds at a time).
    for _ in range(300):
        if _in_use(pool) == 0:
            break
        await asyncio.sleep(0.01)
    assert _in_use(pool) == 0, "a connection is still held by the failed transaction"


async def test_counts_kept_by_a_flush_whose_begin_failed_are_written_by_the_next(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """The usage flush, in one task, after a failed BEGIN: nothing lost, nothing twice."""
    usage: UsageRecorder = app.state.usage
    async with flushes_stopped(usage):
        assert await usage.flush()  # what earlier tests left
        key_id, secret = await ws.create_key()
        codes = [await verify(ws.client, secret) for _ in range(7)]
        assert codes == ["VALID"] * 7
        assert usage.pending_requests == 7
        async with _connections_killed(app) as killing:
            assert not await usage.flush()  # BEGIN failed: the counts are kept for the next
        assert killing.killed
        assert await usage.flush()
    counted = await key_usage(ws, key_id)
    assert (counted["totalRequests"], counted["successfulRequests"]) == (7, 7)
