"""`GET /governance/health`: 200 when the database answers, 503 otherwise. No auth."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from tortoise import connections
from tortoise.exceptions import BaseORMException


async def health(request: Request) -> JSONResponse:
    try:
        await connections.get("default").execute_query("SELECT 1")
    except (BaseORMException, OSError, ConnectionError) as exc:
        return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, 503)
    return JSONResponse({"status": "ok"})
