"""Database configuration and migrations: Tortoise 1.x built-in migrations, never
generate_schemas on a real database.

`DATABASE_ERRORS` is what "the database cannot answer" looks like to a caller. Tortoise only
translates SQL-level asyncpg errors; connection-level ones escape raw: a server starting up or
shutting down refuses with `CannotConnectNowError`/`AdminShutdownError` (asyncpg.PostgresError),
a connection dropped mid-query raises `ConnectionDoesNotExistError` or `InterfaceError`
("connection is closed"). Catching only BaseORMException/OSError turned a PostgreSQL restart into
HTTP 500s and hung waiters (tests/test_faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import os
import pkgutil
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from tortoise import Tortoise, connections
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.sqlite.client import SqliteTransactionContext
from tortoise.exceptions import BaseORMException
from tortoise.migrations.api import migrate as run_migrations
from tortoise.transactions import in_transaction

APP_LABEL = "keyplane"


def as_utc(value: datetime | str) -> datetime:
    """A timestamp read back from either backend (datetimes from asyncpg, ISO text from SQLite,
    aggregates included), UTC-aware."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def latest(*moments: datetime | str | None) -> datetime | None:
    """The latest of these timestamps as read back (see `as_utc`), None when there is none."""
    known = [as_utc(m) for m in moments if m is not None]
    return max(known) if known else None


def any_of(connection: BaseDBAsyncClient, values: Sequence[str]) -> tuple[str, list[Any]]:
    """`column <this>` matching any of these texts, and its parameters: one array parameter on
    PostgreSQL, one placeholder per value on SQLite."""
    if connection.capabilities.dialect == "postgres":
        return "= ANY($1::varchar[])", [list(values)]
    return f"IN ({','.join('?' * len(values))})", list(values)


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    BaseORMException,
    OSError,  # includes ConnectionError (refused, reset) and TimeoutError
    asyncpg.PostgresError,  # untranslated: CannotConnectNowError, AdminShutdownError, ...
    asyncpg.InterfaceError,  # "connection is closed"
    # A pooled connection whose server process was terminated while it sat idle (a restart, an
    # idle timeout, pg_terminate_backend) can fail its next statement with "cannot switch to
    # state ...; another operation is in progress" (tests/test_transactions.py).
    asyncpg.InternalClientError,
    # SQLite's file cannot be (re)opened: raised raw by the transaction context's connect
    # (tests/test_transactions_sqlite.py); SQL-level errors come translated.
    sqlite3.Error,
)

# What a client is told then (the driver's own message may quote a host or a statement).
UNAVAILABLE_MESSAGE = "Database unavailable; try again later"

# Of those, the ones that say "cannot reach it now" rather than "this statement failed" (which
# may be a bug): refused or lost connections (OSError covers Tortoise's DBConnectionError), a
# server starting up, shutting down or cancelling the query, and SQLite's file that cannot be
# opened (raised raw; SQL-level SQLite errors come translated). GraphQL answers these with
# `UNAVAILABLE`, not as an unexpected error.
UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # CannotConnectNowError, AdminShutdownError, ...
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    sqlite3.Error,
)


@contextlib.asynccontextmanager
async def transaction() -> AsyncIterator[BaseDBAsyncClient]:
    """`tortoise.transactions.in_transaction()`, which every write of the service goes through,
    without its leak when BEGIN fails.

    Tortoise 1.1's transaction context takes a connection (PostgreSQL: from the pool; SQLite:
    the connection's lock), points the task's connection context at the transaction, and then
    sends BEGIN. When BEGIN fails (the server dropped that connection meanwhile), it neither
    gives the connection back nor resets the context: the pool has one connection fewer for
    good (SQLite: the lock stays taken), and every later transaction in the same task, such as
    a background flush loop, nests in the dead one and fails too. Here the context's own exit
    runs in that case as well (its rollback fails on the dead connection and is ignored; the
    BEGIN's error is what the caller sees). tests/test_transactions.py.

    SQLite's context takes the connection's lock before it (re)opens the database file, and
    keeps it when that fails: every later transaction would wait for it for good. So the file is
    opened first, outside the lock; when that fails, nothing is taken and the next transaction
    tries again (tests/test_transactions_sqlite.py)."""
    context = in_transaction()
    if isinstance(context, SqliteTransactionContext):
        await context.ensure_connection()
    try:
        connection = await context.__aenter__()
    except BaseException as exc:
        if getattr(context, "token", None) is not None:  # taken and pointed at, BEGIN failed
            with contextlib.suppress(Exception):
                await context.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    try:
        yield connection
    except BaseException as exc:
        await context.__aexit__(type(exc), exc, exc.__traceback__)  # rolls back; never swallows
        raise
    await context.__aexit__(None, None, None)  # commits


def migration_names() -> list[str]:
    """The names of this code's migrations, in order (models/migrations/0001_... and on)."""
    package = importlib.import_module("models.migrations")
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name[:4].isdigit())


async def missing_migrations() -> list[str] | None:
    """This code's migrations that the connected database has not applied (all of them when it
    has no migration table); None when the database cannot be reached now, since a server may
    start while its database is away and serve what it can."""
    try:
        _, rows = await connections.get("default").execute_query(
            f"SELECT name FROM tortoise_migrations WHERE app = '{APP_LABEL}'"
        )
    except UNREACHABLE_ERRORS:
        return None
    except DATABASE_ERRORS:  # no migration table: never migrated
        rows = []
    applied = {row["name"] for row in rows}
    return [name for name in migration_names() if name not in applied]


def _sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL and for an in-memory database)."""
    if not database_url.startswith("sqlite://"):
        return None
    path = database_url.removeprefix("sqlite://")
    return Path(path) if path and path != ":memory:" else None


def tortoise_config(database_url: str) -> dict[str, Any]:
    """The Tortoise config for one database URL; SQLite files get their folder created."""
    file = _sqlite_file(database_url)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
    return {
        "connections": {"default": database_url},
        "apps": {
            APP_LABEL: {
                "models": ["models"],
                "default_connection": "default",
                "migrations": "models.migrations",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


# The key of the PostgreSQL advisory lock held while setting up a database (any constant).
SETUP_LOCK_KEY = 0x6B70_5345


@contextlib.asynccontextmanager
async def setup_lock(database_url: str) -> AsyncIterator[None]:
    """One process at a time migrates (and bootstraps) a database. Containers that start at
    once each run `keyplane migrate`; unserialised, two of them created the same tables and
    all but one failed (tests/test_concurrent_startup.py). PostgreSQL: a session advisory lock
    on a connection of its own, released when that connection closes. SQLite: an exclusive
    flock on `<database file>.setup-lock` (SQLite's own locks cannot be held across the
    migrations' connection). Not re-entrant: take it once per process."""
    if database_url.startswith(("postgres://", "postgresql://")):
        connection = await asyncpg.connect(database_url, timeout=30)
        try:
            await connection.execute("SELECT pg_advisory_lock($1)", SETUP_LOCK_KEY)
            yield
        finally:
            await connection.close()
        return
    file = _sqlite_file(database_url)
    if file is None:
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(f"{file}.setup-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the flock


async def migrate(database_url: str) -> None:
    """Apply every pending migration to the database at `database_url`, holding the setup
    lock (a process that finds the migrations applied by another does nothing)."""
    async with setup_lock(database_url):
        await migrate_holding_lock(database_url)


async def migrate_holding_lock(database_url: str) -> None:
    """`migrate` for a caller that already holds `setup_lock`."""
    try:
        await run_migrations(config=tortoise_config(database_url))
    finally:
        await Tortoise.close_connections()
