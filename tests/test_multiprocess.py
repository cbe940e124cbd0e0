"""Two live server processes on one PostgreSQL: a change made through one (a revocation, and
every other mutation that changes what a verification answers) is seen by the other within 1 s
(LISTEN/NOTIFY), without restarting anything."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.live import live_server
from tests.support import WorkspaceHandle


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_revocation_reaches_every_process_within_a_second(
    ws: WorkspaceHandle, database_url: str
) -> None:
    key_id, secret = await ws.create_key()
    with live_server(database_url) as first, live_server(database_url) as second:
        async with httpx.AsyncClient(timeout=5) as http:
            for base in (first, second):  # both processes now hold the key in their cache
                response = await http.get(f"{base}/v1/verify", headers={"X-API-Key": secret})
                assert response.json()["code"] == "VALID"
            revoked = await http.post(
                f"{first}/graphql",
                json={"query": f'mutation {{ revoke(id: "{key_id}") {{ __typename }} }}'},
                headers={"Authorization": f"Bearer {ws.token}"},
            )
            assert revoked.json()["data"]["revoke"]["__typename"] == "RevokeSuccess"
            # The process that ran the mutation refuses at once.
            at_first = await http.get(f"{first}/v1/verify", headers={"X-API-Key": secret})
            assert at_first.json()["code"] == "REVOKED"
            started = time.monotonic()
            while True:
                at_second = await http.get(f"{second}/v1/verify", headers={"X-API-Key": secret})
                if at_second.json()["code"] == "REVOKED":
                    break
                assert time.monotonic() - started < 1.0, "the other process still said VALID"
                time.sleep(0.02)


async def _graphql(
    http: httpx.AsyncClient, base: str, token: str, query: str, variables: dict[str, Any]
) -> dict[str, Any]:
    response = await http.post(
        f"{base}/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
    )
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    result = next(iter(data.values()))
    assert not result["__typename"].endswith("Error"), result
    return data


async def _code(http: httpx.AsyncClient, base: str, secret: str, headers: dict[str, str]) -> str:
    response = await http.get(f"{base}/v1/verify", headers={"X-API-Key": secret, **headers})
    code: str = response.json()["code"]
    return code


async def _reaches_within_a_second(
    http: httpx.AsyncClient, base: str, secret: str, headers: dict[str, str], want: str
) -> None:
    started = time.monotonic()
    while (got := await _code(http, base, secret, headers)) != want:
        assert time.monotonic() - started < 1.0, f"the other process still said {got}"
        await asyncio.sleep(0.02)


# (mutation, its variables beyond the key's ID, headers of the verification, the answer after)
MUTATIONS: list[tuple[str, dict[str, Any], dict[str, str], str]] = [
    ("setStatus(id: $id, status: DISABLED)", {}, {}, "DISABLED"),
    ("deleteKey(id: $id)", {}, {}, "INVALID_KEY"),
    ('setAllowedIps(id: $id, ips: ["192.0.2.1"])', {}, {}, "IP_NOT_ALLOWED"),
    (
        "updateKey(id: $id, input: {permissions: []})",
        {},
        {"X-Required-Permissions": "pdf.read"},
        "INSUFFICIENT_PERMISSIONS",
    ),
    ("rotateKey(id: $id, graceMinutes: 0)", {}, {}, "REVOKED"),
]


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_every_change_to_an_answer_reaches_every_process(
    ws: WorkspaceHandle, database_url: str
) -> None:
    """Each mutation that changes what a verification answers, run through one live process:
    that process answers anew at once, and the other, which had the key cached, within 1 s."""
    role = await ws.q(
        'mutation { createRole(name: "exports", permissions: ["export.*"]) {'
        " ... on CreateRoleSuccess { role { id } } } }"
    )
    role_id = role["createRole"]["role"]["id"]
    cases = [
        *MUTATIONS,
        (
            "updateKey(id: $id, input: {roleId: $role})",
            {"role": ("ID", role_id)},
            {"X-Required-Permissions": "export.csv"},
            "VALID",
        ),
    ]
    with live_server(database_url) as first, live_server(database_url) as second:
        async with httpx.AsyncClient(timeout=5) as http:
            for field, extra, headers, want in cases:
                key_id, secret = await ws.create_key(permissions=["pdf.read"])
                before = {await _code(http, base, secret, headers) for base in (first, second)}
                assert want not in before, field  # both processes cached the old answer
                declared = "".join(f", ${name}: {kind}" for name, (kind, _) in extra.items())
                await _graphql(
                    http,
                    first,
                    ws.token,
                    f"mutation($id: ID!{declared}) {{ {field} {{ __typename }} }}",
                    {"id": key_id, **{name: value for name, (_, value) in extra.items()}},
                )
                assert await _code(http, first, secret, headers) == want, field
                await _reaches_within_a_second(http, second, secret, headers, want)

            # The environment's authorized origins, for its client-side ID.
            client_side = ws.client_side_ids["production"]
            origin = {"Origin": "https://app.example.com"}
            for base in (first, second):
                assert await _code(http, base, client_side, origin) == "ORIGIN_NOT_ALLOWED"
            await _graphql(
                http,
                first,
                ws.token,
                "mutation($env: ID!) { setAuthorizedOrigins(environmentId: $env,"
                ' origins: ["https://app.example.com"]) { __typename } }',
                {"env": ws.environments["production"]},
            )
            assert await _code(http, first, client_side, origin) == "VALID"
            await _reaches_within_a_second(http, second, client_side, origin, "VALID")

            # An expiry set on a cached key: the other process must know it when it comes.
            key_id, secret = await ws.create_key()
            for base in (first, second):
                assert await _code(http, base, secret, {}) == "VALID"
            expires = datetime.now(UTC) + timedelta(seconds=1.5)
            await _graphql(
                http,
                first,
                ws.token,
                "mutation($id: ID!, $at: DateTime) {"
                " updateKey(id: $id, input: {expiresAt: $at}) { __typename } }",
                {"id": key_id, "at": expires.isoformat()},
            )
            await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
            for base in (first, second):
                assert await _code(http, base, secret, {}) == "EXPIRED"

            # Every key of an environment rotated with no grace.
            env_name = next(name for name in ws.environments if name != "production")
            key_id, secret = await ws.create_key(env=env_name)
            for base in (first, second):
                assert await _code(http, base, secret, {}) == "VALID"
            await _graphql(
                http,
                first,
                ws.token,
                "mutation($env: ID!) { rotateAll(environmentId: $env, graceMinutes: 0) {"
                " __typename } }",
                {"env": ws.environments[env_name]},
            )
            assert await _code(http, first, secret, {}) == "REVOKED"
            await _reaches_within_a_second(http, second, secret, {}, "REVOKED")
