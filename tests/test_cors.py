"""Browser dashboards on other origins: CORS on /graphql only for the configured origins."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from app.main import create_app
from app.settings import Settings, SettingsError, parse_cors_origins
from tests.support import WorkspaceHandle

DASHBOARD = "https://dashboard.example.com"
STRANGER = "https://evil.example.net"


@pytest.fixture
async def cors_client(app: Starlette, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # The session app already initialised the database; this one only adds CORS.
    cors_app = create_app(Settings(database_url=settings.database_url, cors_origins=(DASHBOARD,)))
    transport = httpx.ASGITransport(app=cors_app, client=("203.0.113.20", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        yield client


def _preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


async def test_preflight_from_an_allowed_origin_is_answered(cors_client: httpx.AsyncClient) -> None:
    response = await cors_client.options("/graphql", headers=_preflight(DASHBOARD))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == DASHBOARD
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in response.headers["access-control-allow-methods"]


async def test_preflight_from_another_origin_is_refused(cors_client: httpx.AsyncClient) -> None:
    response = await cors_client.options("/graphql", headers=_preflight(STRANGER))
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


async def test_credentialed_request_from_allowed_origin_gets_cors_headers(
    cors_client: httpx.AsyncClient, ws: WorkspaceHandle
) -> None:
    response = await cors_client.post(
        "/graphql",
        json={"query": "{ workspace { id } }"},
        headers={"Origin": DASHBOARD, "Authorization": f"Bearer {ws.token}"},
    )
    assert response.status_code == 200
    assert response.json()["data"]["workspace"]["id"] == ws.id
    assert response.headers["access-control-allow-origin"] == DASHBOARD
    assert response.headers["access-control-allow-credentials"] == "true"


async def test_request_from_another_origin_gets_no_cors_headers(
    cors_client: httpx.AsyncClient, ws: WorkspaceHandle
) -> None:
    response = await cors_client.post(
        "/graphql",
        json={"query": "{ workspace { id } }"},
        headers={"Origin": STRANGER, "Authorization": f"Bearer {ws.token}"},
    )
    # The browser will not hand this response to the page: no allow-origin header.
    assert "access-control-allow-origin" not in response.headers


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.options("/graphql", headers=_preflight(DASHBOARD))
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("raw", ["*", "https://ok.example.com,*", "ftp://files.example.com"])
def test_bad_cors_settings_are_refused_with_the_reason(raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_cors_origins(raw)
    assert "KEYPLANE_CORS_ORIGINS" in str(info.value)


def test_cors_origins_are_normalised() -> None:
    assert parse_cors_origins(" https://A.example.com:443 , http://b.example.com:8080") == (
        "https://a.example.com",
        "http://b.example.com:8080",
    )


@pytest.mark.parametrize("path", ["/v1/verify", "/v1/verify/api/items"])
async def test_cors_does_not_answer_for_the_verifier(
    cors_client: httpx.AsyncClient, path: str
) -> None:
    # A gateway that forwards every header (Traefik without authRequestHeaders) sends a
    # preflight-shaped OPTIONS to the verifier: it must be refused for lack of a key, not
    # answered 200 by the CORS layer (which would let the request through the gateway).
    response = await cors_client.request("OPTIONS", path, headers=_preflight(DASHBOARD))
    assert response.status_code != 200
    assert "access-control-allow-origin" not in response.headers
    if path != "/v1/verify":
        assert response.status_code == 401
        assert response.json()["code"] == "MISSING_KEY"
