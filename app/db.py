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

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from tortoise import Tortoise
from tortoise.exceptions import BaseORMException
from tortoise.migrations.api import migrate as run_migrations

APP_LABEL = "keyplane"


def as_utc(value: datetime | str) -> datetime:
    """A timestamp read back from either backend (datetimes from asyncpg, ISO text from SQLite,
    aggregates included), UTC-aware."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


DATABASE_ERRORS: tuple[type[Exception], ...] = (
    BaseORMException,
    OSError,  # includes ConnectionError (refused, reset) and TimeoutError
    asyncpg.PostgresError,  # untranslated: CannotConnectNowError, AdminShutdownError, ...
    asyncpg.InterfaceError,  # "connection is closed"
)


def tortoise_config(database_url: str) -> dict[str, Any]:
    """The Tortoise config for one database URL; SQLite files get their folder created."""
    if database_url.startswith("sqlite://"):
        path = database_url.removeprefix("sqlite://")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
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


async def migrate(database_url: str) -> None:
    """Apply every pending migration to the database at `database_url`."""
    try:
        await run_migrations(config=tortoise_config(database_url))
    finally:
        await Tortoise.close_connections()
