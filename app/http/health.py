"""`GET /governance/health`: 200 when the database answers, 503 otherwise. No auth.

Any database failure (`app.db.DATABASE_ERRORS`: also asyncpg's untranslated "starting up" /
"shutting down" refusals while PostgreSQL restarts) is a 503, never a 500.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from tortoise import connections

from app.db import DATABASE_ERRORS


async def health(request: Request) -> JSONResponse:
    try:
        await connections.get("default").execute_query("SELECT 1")
    except DATABASE_ERRORS as exc:
        return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, 503)
    return JSONResponse({"status": "ok"})
