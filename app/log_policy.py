"""Keep secrets out of logs.

Database drivers log every statement with its parameters at DEBUG level; those parameters
include token hashes (lookups, inserts) and so must never be emitted, whatever level an operator
configures. Their DEBUG records are dropped at the source logger.

An unforeseen exception (a bug) is logged by `unforeseen`: its type and where it was raised,
never its message, which can quote a value (a token hash, a database row).
"""

from __future__ import annotations

import logging
import traceback

SQL_LOGGERS = ("tortoise.db_client", "aiosqlite", "asyncpg")


class DropDebug(logging.Filter):
    """Refuses DEBUG (and lower) records: for loggers whose debug output carries SQL params."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


_FILTER = DropDebug()


def install() -> None:
    """Attach the filter to the database loggers; idempotent."""
    for name in SQL_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def unforeseen(log: logging.Logger, what: str, exc: BaseException) -> None:
    """Log a bug: what failed, the exception's type and its stack (code lines), not its
    message."""
    stack = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    log.error("%s (%s)\n%s", what, type(exc).__name__, stack)
