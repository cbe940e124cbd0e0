"""The baseline: a bare Starlette app with one JSON route, served by the same uvicorn settings as
`keyplane serve`, answering a body of the same shape and size as a VALID verification."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def verify(request: Request) -> JSONResponse:
    # Read the key header like the real endpoint does, so the request work is comparable.
    key = request.headers.get("x-api-key", "")
    return JSONResponse(
        {
            "valid": bool(key),
            "code": "VALID",
            "message": "API key is valid",
            "keyId": "key_0000000000000000000000",
            "keyType": "SERVER",
            "environmentId": "env_0000000000000000000000",
            "workspaceId": "ws_0000000000000000000000",
            "permissions": ["pdf.generate", "template.read"],
            "expiresAt": None,
            "graceEndsAt": None,
        }
    )


app = Starlette(routes=[Route("/v1/verify", verify, methods=["GET", "POST"])])
