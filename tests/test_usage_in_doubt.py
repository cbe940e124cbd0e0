"""A usage flush whose COMMIT goes unanswered is counted once, whether it committed or not.

When the connection drops after a flush sent its COMMIT, the service cannot know whether the
server committed it. Putting its counts back, as after any other failed flush, would count them
twice when it did. So the flush's transaction notes its number on its writer's row
(`usage_writers`), and the next flush reads it first (`app.usage._InDoubt`).

The faults are real: the service's connections go through a TCP proxy in front of PostgreSQL
(`CommitCutter`) that, when armed, cuts the connection at the next COMMIT, either after the
server has answered it (the answer is lost) or before the COMMIT reaches the server, whose
backend then sits idle in the transaction, holding its locks, until the test lets it go or the
server ends it.

On SQLite (one process, a local file) a COMMIT cannot go unanswered; there the writer row is
only checked to follow the flushes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from starlette.applications import Starlette
from tortoise import connections

import app.usage as usage_module
from app.usage import UsageRecorder
from models import Denial, UsageWriter
from tests.support import OffsetClock, WorkspaceHandle, flushes_stopped, verify
from tests.test_usage import key_usage

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104  # the untyped messages a client may send first


class CommitCutter:
    """A TCP proxy to PostgreSQL. Armed (`arm`), it cuts the connection that sends the next
    COMMIT (a simple-protocol query, as asyncpg sends it):

    - "answer lost": the COMMIT goes to the server, which commits and answers; the answer is
      dropped and both sides closed;
    - "held": the COMMIT is kept back and the client side closed; the server side stays open,
      its transaction idle and holding its locks, until `release` sends the COMMIT late (or
      closes it: the server rolls back), or the server itself ends the transaction."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.mode: str | None = None
        self.cut: str | None = None  # the mode of the cut made
        self.answered = asyncio.Event()  # the server answered the cut connection's COMMIT
        self._held: tuple[bytes, asyncio.StreamWriter] | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def arm(self, mode: str) -> None:
        assert mode in ("answer lost", "held")
        self.mode = mode

    async def release(self, *, commit: bool) -> None:
        """The held COMMIT reaches the server after all (`commit`), or its connection closes."""
        assert self._held is not None, "no COMMIT was held"
        message, upstream = self._held
        self._held = None
        if commit:
            upstream.write(message)
            await upstream.drain()
            await asyncio.wait_for(self.answered.wait(), 10)
        upstream.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, upstream_w]
        muted = asyncio.Event()
        down = asyncio.create_task(self._down(upstream_r, client_w, muted))
        self._tasks.add(down)
        try:
            await self._up(client_r, client_w, upstream_w, muted)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self._held is None or self._held[1] is not upstream_w:
                upstream_w.close()
            client_w.close()

    async def _down(
        self, upstream: asyncio.StreamReader, client: asyncio.StreamWriter, muted: asyncio.Event
    ) -> None:
        with suppress(ConnectionError):
            while data := await upstream.read(65536):
                if muted.is_set():
                    self.answered.set()  # the answer to the cut COMMIT: dropped
                    continue
                client.write(data)
                await client.drain()

    async def _up(
        self,
        client: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
        muted: asyncio.Event,
    ) -> None:
        started = False  # past the untyped start-up messages
        while True:
            if not started:
                head = await client.readexactly(4)
                body = await client.readexactly(int.from_bytes(head, "big") - 4)
                started = int.from_bytes(body[:4], "big") not in (SSL_REQUEST, GSS_REQUEST)
                upstream.write(head + body)
                await upstream.drain()
                continue
            head = await client.readexactly(5)
            message = head + await client.readexactly(int.from_bytes(head[1:], "big") - 4)
            if (
                self.mode
                and head[:1] == b"Q"
                and message[5:].lstrip().upper().startswith(b"COMMIT")
            ):
                mode, self.mode, self.cut = self.mode, None, self.mode
                muted.set()
                if mode == "answer lost":
                    upstream.write(message)
                    await upstream.drain()
                    await asyncio.wait_for(self.answered.wait(), 10)
                else:
                    self._held = (message, upstream)
                return
            upstream.write(message)
            await upstream.drain()


@asynccontextmanager
async def _through(app: Starlette) -> AsyncIterator[CommitCutter]:
    """While inside: the service's connections (a pool of their own) go through a CommitCutter,
    and its background usage and activity flushes are stopped (the test flushes itself; a
    background flush would take the counts or the cut)."""
    usage: UsageRecorder = app.state.usage
    async with flushes_stopped(usage, app.state.activity):
        client = connections.get("default")
        await client.execute_query("SELECT 1")  # the pool is created on first use
        pool = client._pool
        cutter = CommitCutter(int(client._template["port"]))
        await cutter.start()
        template: dict[str, Any] = {**client._template, "port": cutter.port}
        client._pool = proxied = await asyncpg.create_pool(
            None, password=client.password, **template
        )
        try:
            assert await usage.flush()  # what earlier tests left
            yield cutter
        finally:
            client._pool = pool
            proxied.terminate()
            await cutter.stop()


async def _verifications(ws: WorkspaceHandle) -> str:
    """A new key, 7 verifications of it: 5 valid, 2 refused (so 2 denial rows). Its ID."""
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    codes = [await verify(ws.client, secret) for _ in range(5)]
    codes += [await verify(ws.client, secret, permissions="admin.all") for _ in range(2)]
    assert codes == ["VALID"] * 5 + ["INSUFFICIENT_PERMISSIONS"] * 2
    return key_id


async def _counted(ws: WorkspaceHandle, key_id: str) -> tuple[int, int, int, int]:
    """(total, successful, failed, denial rows) as written."""
    usage = await key_usage(ws, key_id)
    denials = await Denial.filter(key_id=key_id).count()
    return usage["totalRequests"], usage["successfulRequests"], usage["failedRequests"], denials


@pytest.mark.postgres_only
async def test_a_flush_whose_commit_answer_was_lost_is_not_written_again(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    usage: UsageRecorder = app.state.usage
    async with _through(app) as cutter:
        key_id = await _verifications(ws)
        cutter.arm("answer lost")
        assert not await usage.flush()  # the COMMIT's answer never came
        assert cutter.cut == "answer lost" and cutter.answered.is_set()
        assert usage.pending_requests == 7 and usage.pending_denials == 2  # held, not lost
        assert await usage.flush()  # reads that it committed
        assert usage.pending_requests == 0 and usage.pending_denials == 0
        assert await usage.flush()
    assert await _counted(ws, key_id) == (7, 5, 2, 2)


@pytest.mark.postgres_only
@pytest.mark.parametrize("late_commit", [True, False], ids=["commits-late", "never-commits"])
async def test_the_check_waits_for_a_flush_whose_commit_was_held_back(
    app: Starlette, ws: WorkspaceHandle, late_commit: bool
) -> None:
    """The COMMIT is held back while the next flush checks: the check waits for the
    transaction. Then the COMMIT arrives late (committed: not written again), or its
    connection closes (the server rolls back: the counts are put back and written)."""
    usage: UsageRecorder = app.state.usage
    async with _through(app) as cutter:
        key_id = await _verifications(ws)
        cutter.arm("held")
        assert not await usage.flush()
        assert cutter.cut == "held"
        check = asyncio.create_task(usage.flush())
        await asyncio.sleep(0.5)
        assert not check.done(), "the check did not wait for the transaction holding the row"
        await cutter.release(commit=late_commit)
        assert await check
        assert usage.pending_requests == 0
    assert await _counted(ws, key_id) == (7, 5, 2, 2)


@pytest.mark.postgres_only
async def test_the_server_ends_a_flush_left_idle_by_a_lost_connection(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody releases the held COMMIT: PostgreSQL ends the idle transaction itself (the flush
    sets idle_in_transaction_session_timeout for its own), and the counts are written once."""
    usage: UsageRecorder = app.state.usage
    monkeypatch.setattr(usage_module, "FLUSH_IDLE_SECONDS", 0.5)  # + the 1 s flush interval
    async with _through(app) as cutter:
        key_id = await _verifications(ws)
        cutter.arm("held")
        assert not await usage.flush()
        # The check waits for the held row IN_DOUBT_WAIT_SECONDS (2 s) at most, and a check that
        # gives up fails the flush: this one succeeds, so the server ended the transaction
        # first (at 1.5 s). Only the lower bound is timed: the rest of the flush's own writes
        # are not part of the wait.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await usage.flush()
        assert loop.time() - started > 1.0
        assert cutter._held is not None  # still held: it was the server that ended it
    assert await _counted(ws, key_id) == (7, 5, 2, 2)


async def test_each_flush_notes_its_number_on_its_writer_row(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    usage: UsageRecorder = app.state.usage
    async with flushes_stopped(usage):
        key_id, secret = await ws.create_key()
        for _ in range(2):
            assert await verify(ws.client, secret) == "VALID"
            assert await usage.flush()
            row = await UsageWriter.get(writer=usage.writer)
            assert row.flushed == usage._sequence > 0
        before = usage._sequence
        assert await usage.flush()  # nothing to write: no transaction, no number
        assert usage._sequence == before
    assert (await key_usage(ws, key_id))["totalRequests"] == 2


async def test_rows_of_writers_not_heard_of_for_a_month_are_pruned(
    app: Starlette, clock: OffsetClock
) -> None:
    usage: UsageRecorder = app.state.usage
    now = clock.now()
    gone, kept = -(10**12) - 1, -(10**12) - 2  # no recorder draws a negative writer ID
    await UsageWriter.create(writer=gone, flushed=3, at=now - timedelta(days=31))
    await UsageWriter.create(writer=kept, flushed=4, at=now - timedelta(days=29))
    try:
        await usage.prune(now)
        assert not await UsageWriter.filter(writer=gone).exists()
        assert (await UsageWriter.get(writer=kept)).flushed == 4
    finally:
        await UsageWriter.filter(writer__in=[gone, kept]).delete()
