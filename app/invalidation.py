"""Cross-process cache invalidation on PostgreSQL: LISTEN/NOTIFY.

Each process NOTIFYs the hashes a committed mutation changed and LISTENs on a dedicated asyncpg
connection, dropping what others changed. While that connection is down notifications can be
lost, so the cache is cleared on every (re)connect and bypassed until the listener is back.

A payload opens with its sender's origin (`@<random id>`, one per app): a process skips its
own notices, as its cache dropped those keys before the mutation returned. Heard late, its own
notice would drop an entry already read back from the committed row: one needless miss, and
the key's pending usage split over two tallies (a CI run failed on that, 2026-11-27). A process
that does not know the marker drops it like any other hash, which is a no-op.

Fault handling (tests/test_faults.py): the reconnect loop survives every database failure
(`app.db.DATABASE_ERRORS`; a probe on a connection PostgreSQL just closed raises
asyncpg.InterfaceError, which used to end the task, leaving the cache bypassed for good and
making `stop()` raise, so the lifespan never reached the usage flush); the liveness probe has a
timeout, and a failed probe means reconnecting (a frozen or unreachable server must not leave
the cache trusted while notifications cannot arrive); `stop()` never raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import asyncpg
from tortoise import connections

from app.cache import KeyCache
from app.db import DATABASE_ERRORS
from app.log_policy import unforeseen

logger = logging.getLogger("keyplane.invalidation")

CHANNEL = "keyplane_keys"
MAX_PAYLOAD = 7900  # NOTIFY payloads must stay under 8000 bytes
PROBE_TIMEOUT = 2.0  # seconds; a half-open connection must not stall the liveness probe


def new_origin() -> str:
    """The marker that opens this process's payloads (not a secret: it only names a sender)."""
    return "@" + secrets.token_hex(8)


def chunks(hashes: Sequence[str], origin: str) -> list[str]:
    """Comma-joined payloads, each under the NOTIFY limit and opened by the sender's origin."""
    payloads: list[str] = []
    current: list[str] = []
    size = len(origin)
    for item in hashes:
        if current and size + len(item) + 1 > MAX_PAYLOAD:
            payloads.append(",".join([origin, *current]))
            current, size = [], len(origin)
        current.append(item)
        size += len(item) + 1
    if current:
        payloads.append(",".join([origin, *current]))
    return payloads


class Notifier:
    """A ChangeFeed listener that tells the other processes (after the local cache dropped)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    async def keys_changed(self, secret_hashes: Sequence[str]) -> None:
        client = connections.get("default")
        for payload in chunks(secret_hashes, self.origin):
            try:
                await client.execute_query("SELECT pg_notify($1, $2)", [CHANNEL, payload])
            except Exception:  # the mutation committed; a lost notice is covered by the refresh
                logger.warning("could not NOTIFY a key change; other caches refresh later")


class Listener:
    """Keeps a LISTEN connection open, reconnecting with backoff."""

    def __init__(self, dsn: str, cache: KeyCache, origin: str) -> None:
        self.dsn = dsn
        self.cache = cache
        self.origin = origin  # this process's notices: its cache already dropped their keys
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        items = payload.split(",")
        if items[0] == self.origin:
            return
        for secret_hash in items:  # another origin's marker is dropped too: a no-op
            self.cache.drop(secret_hash)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
            except DATABASE_ERRORS:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            try:
                await conn.add_listener(CHANNEL, self._on_notify)
                # Anything could have changed while nobody was listening.
                self.cache.clear()
                self.cache.trusted = True
                self._connected.set()
                while not conn.is_closed():
                    await asyncio.sleep(0.25)
                    # A probe that fails or times out means notifications may be missed too:
                    # reconnect (the cache is bypassed meanwhile and cleared on reconnect).
                    await conn.execute("SELECT 1", timeout=PROBE_TIMEOUT)
            except DATABASE_ERRORS:
                pass
            finally:
                self.cache.trusted = False
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    async def start(self, wait: float = 5.0) -> None:
        """Start listening; waits (bounded) for the first connection."""
        self.cache.trusted = False
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait)

    async def stop(self) -> None:
        """Stop listening. Never raises: shutdown must go on to flush the usage buffers."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the task died of something unforeseen; shut down anyway
                unforeseen(logger, "the LISTEN task had failed", exc)
            self._task = None
