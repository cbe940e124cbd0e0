"""The Python client and middleware (`app.client`) against the real app: the positive cache's
bounds, header values that are not ASCII, and WebSocket handshakes."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import timedelta
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette

from app.client import MAX_CACHE_SECONDS, KeyplaneAuthMiddleware, KeyplaneClient
from tests.pgserver import free_port
from tests.support import OffsetClock, WorkspaceHandle


def _client(app: Starlette, clock: OffsetClock, **kw: Any) -> KeyplaneClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    # The client reads the app's clock, so pushing it past an expiry is seen by both.
    return KeyplaneClient(
        "http://kp.test", transport=transport, clock=lambda: clock.now().timestamp(), **kw
    )


@pytest.mark.parametrize("seconds", [-1, MAX_CACHE_SECONDS + 1, math.nan, math.inf, "5", True])
def test_cache_seconds_out_of_range_is_refused_naming_the_value(seconds: Any) -> None:
    with pytest.raises(ValueError, match="cache_seconds") as raised:
        KeyplaneClient("http://kp.test", cache_seconds=seconds)
    assert repr(seconds) in str(raised.value)


async def _disable(ws: WorkspaceHandle, key_id: str) -> None:
    data = await ws.q(
        "mutation($id: ID!) { setStatus(id: $id, status: DISABLED) { __typename } }",
        {"id": key_id},
    )
    assert data["setStatus"]["__typename"] == "SetStatusSuccess", data


async def test_cached_valid_never_outlives_the_keys_expiry(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    expires = clock.now() + timedelta(seconds=30)
    key_id, secret = await ws.create_key(expiresAt=expires.isoformat())
    client = _client(app, clock, cache_seconds=MAX_CACHE_SECONDS)
    first = await client.verify_async(secret)
    assert first.valid and first.expires_at
    # The cache is on: disabled in Keyplane, the key still passes here (the documented trade).
    await _disable(ws, key_id)
    assert (await client.verify_async(secret)).code == "VALID"
    # Past its expiry the cached answer is gone, although cache_seconds has not run out.
    clock.advance(seconds=31)
    after = await client.verify_async(secret)
    assert (after.valid, after.code) == (False, "DISABLED")
    await client.aclose()


async def test_cached_valid_never_outlives_a_revoked_keys_grace(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, secret = await ws.create_key()
    data = await ws.q(
        "mutation($id: ID!) { revoke(id: $id, graceMinutes: 15) { __typename } }", {"id": key_id}
    )
    assert data["revoke"]["__typename"] == "RevokeSuccess", data
    client = _client(app, clock, cache_seconds=MAX_CACHE_SECONDS)
    first = await client.verify_async(secret)
    assert first.valid and first.grace_ends_at
    assert (await client.verify_async(secret)).valid
    clock.advance(minutes=15, seconds=1)
    after = await client.verify_async(secret)
    assert (after.valid, after.code) == (False, "REVOKED")
    await client.aclose()


async def _guarded_service(app: Starlette, clock: OffsetClock) -> tuple[Any, KeyplaneClient]:
    client = _client(app, clock)

    async def protected(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": scope["state"]["keyplane"].key_id})
            await send({"type": "websocket.close", "code": 1000})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send(
            {"type": "http.response.body", "body": scope["state"]["keyplane"].key_id.encode()}
        )

    guarded = KeyplaneAuthMiddleware(protected, base_url="http://kp.test", client=client)
    return guarded, client


async def test_middleware_refuses_header_values_that_are_not_ascii_without_failing(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, secret = await ws.create_key()
    guarded, client = await _guarded_service(app, clock)
    outer = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=outer, base_url="http://svc.test") as svc:
        # Bytes a server decodes as Latin-1: a key cannot hold them, so INVALID_KEY, not 500.
        for raw in (secret.encode() + "é".encode(), "ключ".encode(), b"\xff\xfe"):
            refused = await svc.get("/", headers={b"x-api-key": raw})
            assert refused.status_code == 401, refused.text
            assert refused.json()["code"] == "INVALID_KEY"
            refused = await svc.get("/", headers={b"authorization": b"Bearer " + raw})
            assert refused.json()["code"] == "INVALID_KEY"
        # A valid key with an Origin that is not ASCII reaches Keyplane and is answered.
        ok = await svc.get(
            "/", headers={b"x-api-key": secret.encode(), b"origin": "https://é.test".encode()}
        )
        assert (ok.status_code, ok.text) == (200, key_id)
    # Called directly, the client refuses such a token the same way.
    direct = await client.verify_async("kp_sdk_" + "é" * 10)
    assert (direct.valid, direct.code, direct.status_code) == (False, "INVALID_KEY", 401)
    await client.aclose()


@pytest.mark.parametrize("denial_response", [True, False])
async def test_middleware_checks_websocket_handshakes(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock, denial_response: bool
) -> None:
    key_id, secret = await ws.create_key()
    guarded, client = await _guarded_service(app, clock)

    async def served(scope: Any, receive: Any, send: Any) -> None:
        if not denial_response:  # a server without the ASGI denial response extension
            scope = {**scope, "extensions": {}}
        await guarded(scope, receive, send)

    port = free_port()
    config = uvicorn.Config(
        served,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the guarded service did not start"
            await asyncio.sleep(0.02)
        url = f"ws://127.0.0.1:{port}/stream"
        async with websockets.connect(url, additional_headers={"X-API-Key": secret}) as conn:
            assert await conn.recv() == key_id
        for headers in ({}, {"X-API-Key": secret[:-1] + ("A" if secret[-1] != "A" else "B")}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url, additional_headers=headers):
                    pass
            response = refused.value.response
            if denial_response:  # Keyplane's status and body
                expected = "MISSING_KEY" if not headers else "INVALID_KEY"
                assert response.status_code == 401
                assert json.loads(response.body)["code"] == expected
            else:  # closed before it was accepted: the server answers 403
                assert response.status_code == 403
    finally:
        server.should_exit = True
        await serving
        await client.aclose()
