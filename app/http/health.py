"""`GET /governance/health`: 200 when the database answers, 503 otherwise. No auth.

Any database failure (`app.db.DATABASE_ERRORS`: also asyncpg's untranslated "starting up" /
"shutting down" refusals while PostgreSQL restarts) is a 503, never a 500.

A frozen database (SIGSTOPped, or a network blackhole) answers nothing and refuses nothing, so
the probe's wait is bounded: after HEALTH_TIMEOUT_SECONDS the answer is 503. The query itself is
not cancelled (cancelling an asyncpg query waits on the frozen server too); it keeps running in
the background, and while it does, further health requests share it instead of piling up more
(tests/test_faults.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from tortoise import connections

from app.db import DATABASE_ERRORS

HEALTH_TIMEOUT_SECONDS = 2.0


def _probe(request: Request) -> asyncio.Task[Any]:
    """The database probe in flight for this app, or a new one when none is."""
    state = request.app.state
    probe: asyncio.Task[Any] | None = getattr(state, "health_probe", None)
    if probe is None or probe.done():
        probe = asyncio.create_task(connections.get("default").execute_query("SELECT 1"))
        probe.add_done_callback(_retrieve)
        state.health_probe = probe
    return probe


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # read: a probe nobody waited for must not log "never retrieved"


async def health(request: Request) -> JSONResponse:
    probe = _probe(request)
    done, _ = await asyncio.wait({probe}, timeout=HEALTH_TIMEOUT_SECONDS)
    if not done:
        return JSONResponse({"status": "unavailable", "reason": "timeout"}, 503)
    if probe.cancelled():
        return JSONResponse({"status": "unavailable", "reason": "cancelled"}, 503)
    exc = probe.exception()
    if exc is None:
        return JSONResponse({"status": "ok"})
    if isinstance(exc, DATABASE_ERRORS):
        return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, 503)
    raise exc
