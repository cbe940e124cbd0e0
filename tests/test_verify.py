"""`/v1/verify` through the real app: every code, every key source, cache invalidation by each
mutation before it returns, grace and expiry by the injected clock, Origin and IP rules."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.cache import KeyCache
from app.client import KeyplaneAuthMiddleware, KeyplaneClient
from tests.support import OffsetClock, WorkspaceHandle


async def _verify(client: httpx.AsyncClient, token: str | None, **kw: Any) -> httpx.Response:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers.setdefault("X-API-Key", token)
    return await client.get("/v1/verify", headers=headers, **kw)


async def _code(client: httpx.AsyncClient, token: str | None, **kw: Any) -> tuple[int, str]:
    response = await _verify(client, token, **kw)
    return response.status_code, response.json()["code"]


async def test_valid_key_answers_with_its_identity_and_never_the_secret(
    ws: WorkspaceHandle,
) -> None:
    key_id, secret = await ws.create_key(permissions=["pdf.*"])
    response = await _verify(ws.client, secret)
    assert response.status_code == 200
    body = response.json()
    assert body["valid"] is True and body["code"] == "VALID"
    assert body["keyId"] == key_id and body["keyType"] == "SERVER"
    assert body["workspaceId"] == ws.id
    assert body["environmentId"] == ws.environments["production"]
    assert body["permissions"] == ["pdf.*"]
    assert secret not in response.text


async def test_the_key_is_read_from_bearer_then_x_api_key_then_body(ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key(permissions=["a.b"])
    ways = [
        ws.client.get("/v1/verify", headers={"Authorization": f"Bearer {secret}"}),
        ws.client.get("/v1/verify", headers={"X-API-Key": secret}),
        ws.client.post("/v1/verify", json={"key": secret}),
    ]
    for way in ways:
        response = await way
        assert (response.status_code, response.json()["code"]) == (200, "VALID")


@pytest.mark.parametrize("held", [["pdf.generate"], ["pdf.*"]])
async def test_permissions_from_body_header_or_query_give_the_same_answer(
    ws: WorkspaceHandle, held: list[str]
) -> None:
    _, secret = await ws.create_key(permissions=held)
    for needed, expected in [("pdf.generate", 200), ("billing.refund", 403)]:
        answers = [
            await ws.client.post("/v1/verify", json={"key": secret, "permissions": [needed]}),
            await _verify(ws.client, secret, headers={"X-Required-Permissions": needed}),
            await _verify(ws.client, secret, params={"permissions": needed}),
        ]
        assert {a.status_code for a in answers} == {expected}
    status, code = await _code(ws.client, secret, headers={"X-Required-Permissions": "x.y"})
    assert (status, code) == (403, "INSUFFICIENT_PERMISSIONS")


async def test_missing_malformed_and_unknown_keys(ws: WorkspaceHandle, app: Starlette) -> None:
    _, secret = await ws.create_key()
    cache: KeyCache = app.state.key_cache
    assert await _code(ws.client, None) == (401, "MISSING_KEY")
    misses = cache.misses
    # A bad checksum is refused before any lookup.
    tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert await _code(ws.client, tampered) == (401, "INVALID_KEY")
    assert await _code(ws.client, "not-a-key") == (401, "INVALID_KEY")
    assert cache.misses == misses
    # A well-formed unknown token is looked up once, then remembered as unknown.
    await ws.q(
        "mutation($id: ID!) { deleteKey(id: $id) { __typename } }",
        {"id": (await ws.create_key())[0]},
    )
    unknown = secret.replace(secret[9:13], "ZZZZ")
    from app.tokens import checksum

    unknown = unknown[:-6] + checksum(unknown[:-6])
    assert await _code(ws.client, unknown) == (401, "INVALID_KEY")
    after_first = cache.misses
    assert await _code(ws.client, unknown) == (401, "INVALID_KEY")
    assert cache.misses == after_first


async def test_disable_enable_revoke_delete_take_effect_on_the_next_verify(
    ws: WorkspaceHandle,
) -> None:
    key_id, secret = await ws.create_key()
    assert await _code(ws.client, secret) == (200, "VALID")  # now cached
    set_status = (
        "mutation($id: ID!, $s: KeyStatus!) { setStatus(id: $id, status: $s) { __typename } }"
    )
    await ws.q(set_status, {"id": key_id, "s": "DISABLED"})
    assert await _code(ws.client, secret) == (401, "DISABLED")
    await ws.q(set_status, {"id": key_id, "s": "ENABLED"})
    assert await _code(ws.client, secret) == (200, "VALID")
    await ws.q("mutation($id: ID!) { revoke(id: $id) { __typename } }", {"id": key_id})
    assert await _code(ws.client, secret) == (401, "REVOKED")
    other_id, other = await ws.create_key()
    assert await _code(ws.client, other) == (200, "VALID")
    await ws.q("mutation($id: ID!) { deleteKey(id: $id) { __typename } }", {"id": other_id})
    assert await _code(ws.client, other) == (401, "INVALID_KEY")


async def test_revoked_key_verifies_until_its_grace_ends(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, secret = await ws.create_key()
    await ws.q(
        "mutation($id: ID!) { revoke(id: $id, graceMinutes: 15) { __typename } }", {"id": key_id}
    )
    response = await _verify(ws.client, secret)
    assert response.json()["code"] == "VALID" and response.json()["graceEndsAt"]
    clock.advance(minutes=16)
    assert await _code(ws.client, secret) == (401, "REVOKED")


async def test_an_incident_revoke_cuts_a_grace_period_short(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """After a rotation with a long grace, revoke(graceMinutes: 0) was INVALID_STATE ("already
    revoked"): a leaked old secret stayed valid for the rest of the grace, up to 24 h."""
    key_id, secret = await ws.create_key()
    revoke = """mutation($id: ID!, $g: Int!) { revoke(id: $id, graceMinutes: $g) {
      __typename ... on RevokeSuccess { key { status graceEndsAt } }
      ... on Error { code message } } }"""
    rotated = await ws.q(
        "mutation($id: ID!) { rotateKey(id: $id, graceMinutes: 1440) { __typename } }",
        {"id": key_id},
    )
    assert rotated["rotateKey"]["__typename"] == "RotateKeySuccess"
    assert await _code(ws.client, secret) == (200, "VALID")  # cached, in its grace
    # A revoke may shorten the grace, never lengthen it.
    shorter = (await ws.q(revoke, {"id": key_id, "g": 60}))["revoke"]
    assert shorter["key"]["status"] == "REVOKED"
    ends = datetime.fromisoformat(shorter["key"]["graceEndsAt"])
    assert abs(ends - (clock.now() + timedelta(minutes=60))) < timedelta(seconds=5)
    longer = (await ws.q(revoke, {"id": key_id, "g": 240}))["revoke"]
    assert longer["code"] == "INVALID_STATE" and "only shorten" in longer["message"]
    assert await _code(ws.client, secret) == (200, "VALID")
    at_once = (await ws.q(revoke, {"id": key_id, "g": 0}))["revoke"]
    assert at_once["key"] == {"status": "REVOKED", "graceEndsAt": None}
    assert await _code(ws.client, secret) == (401, "REVOKED")
    # Once refused, there is nothing left to shorten.
    again = (await ws.q(revoke, {"id": key_id, "g": 0}))["revoke"]
    assert again["code"] == "INVALID_STATE" and "already revoked" in again["message"]


async def test_rotate_all_leaves_no_old_secret_in_its_grace(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """rotateAll skipped keys already revoked, so the old secret of an earlier rotation with a
    grace period kept working after an environment-wide rotateAll(graceMinutes: 0)."""
    key_id, old = await ws.create_key(env="staging")
    rotated = await ws.q(
        "mutation($id: ID!) { rotateKey(id: $id, graceMinutes: 1440) {"
        " ... on RotateKeySuccess { secret } } }",
        {"id": key_id},
    )
    newer = rotated["rotateKey"]["secret"]
    assert await _code(ws.client, old) == (200, "VALID")
    rotate_all = """mutation($env: ID!, $g: Int!) { rotateAll(environmentId: $env, graceMinutes: $g)
      { ... on RotateAllSuccess { rotated { secret } } } }"""
    # A longer grace than the one left changes nothing; a shorter one shortens it.
    await ws.q(rotate_all, {"env": ws.environments["staging"], "g": 60})
    assert await _code(ws.client, old) == (200, "VALID")
    assert await _code(ws.client, newer) == (200, "VALID")
    graces = await ws.q("query($id: ID!) { key(id: $id) { graceEndsAt } }", {"id": key_id})
    ends = datetime.fromisoformat(graces["key"]["graceEndsAt"])
    assert ends - clock.now() < timedelta(minutes=61)
    data = await ws.q(rotate_all, {"env": ws.environments["staging"], "g": 0})
    assert len(data["rotateAll"]["rotated"]) == 1
    for secret in (old, newer):
        assert await _code(ws.client, secret) == (401, "REVOKED")
    assert await _code(ws.client, data["rotateAll"]["rotated"][0]["secret"]) == (200, "VALID")


async def test_expired_key_is_refused(ws: WorkspaceHandle, clock: OffsetClock) -> None:
    expires = (clock.now() + timedelta(minutes=5)).isoformat()
    _, secret = await ws.create_key(expiresAt=expires)
    assert await _code(ws.client, secret) == (200, "VALID")
    clock.advance(minutes=6)
    assert await _code(ws.client, secret) == (401, "EXPIRED")


async def test_allowlist_and_permission_changes_apply_at_once(ws: WorkspaceHandle) -> None:
    key_id, secret = await ws.create_key(permissions=["a.read"])
    assert await _code(ws.client, secret) == (200, "VALID")
    await ws.q(
        'mutation($id: ID!) { setAllowedIps(id: $id, ips: ["198.51.100.0/24"]) { __typename } }',
        {"id": key_id},
    )
    # The test client's address is 203.0.113.10, not on the list.
    assert await _code(ws.client, secret) == (403, "IP_NOT_ALLOWED")
    assert (await _verify(ws.client, secret)).json()["message"] == "IP address not allowed"
    await ws.q(
        "mutation($id: ID!) { setAllowedIps(id: $id, ips: []) { __typename } }", {"id": key_id}
    )
    headers = {"X-Required-Permissions": "a.write"}
    assert await _code(ws.client, secret, headers=headers) == (403, "INSUFFICIENT_PERMISSIONS")
    await ws.q(
        'mutation($id: ID!) { updateKey(id: $id, input: {permissions: ["a.*"]}) { __typename } }',
        {"id": key_id},
    )
    assert await _code(ws.client, secret, headers=headers) == (200, "VALID")


async def test_role_expiry_and_rotation_changes_apply_at_once(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """The rest of the mutations that change an answer, each on a key cached just before."""
    role = await ws.q(
        'mutation { createRole(name: "exports", permissions: ["export.*"]) {'
        " ... on CreateRoleSuccess { role { id } } } }"
    )
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    headers = {"X-Required-Permissions": "export.csv"}
    assert await _code(ws.client, secret, headers=headers) == (403, "INSUFFICIENT_PERMISSIONS")
    await ws.q(
        "mutation($id: ID!, $role: ID) { updateKey(id: $id, input: {roleId: $role}) {"
        " __typename } }",
        {"id": key_id, "role": role["createRole"]["role"]["id"]},
    )
    assert await _code(ws.client, secret, headers=headers) == (200, "VALID")

    # An expiry set on a cached key (which had none) holds when its time comes.
    await ws.q(
        "mutation($id: ID!, $at: DateTime) { updateKey(id: $id, input: {expiresAt: $at}) {"
        " __typename } }",
        {"id": key_id, "at": (clock.now() + timedelta(minutes=5)).isoformat()},
    )
    assert await _code(ws.client, secret) == (200, "VALID")
    clock.advance(minutes=6)
    assert await _code(ws.client, secret) == (401, "EXPIRED")

    # Rotation with no grace: the old secret is refused at once, the new one verifies.
    key_id, secret = await ws.create_key()
    assert await _code(ws.client, secret) == (200, "VALID")
    rotated = await ws.q(
        "mutation($id: ID!) { rotateKey(id: $id, graceMinutes: 0) {"
        " ... on RotateKeySuccess { secret } } }",
        {"id": key_id},
    )
    assert await _code(ws.client, secret) == (401, "REVOKED")
    assert await _code(ws.client, rotated["rotateKey"]["secret"]) == (200, "VALID")
    env = next(name for name in ws.environments if name != "production")
    _, secret = await ws.create_key(env=env)
    assert await _code(ws.client, secret) == (200, "VALID")
    await ws.q(
        "mutation($env: ID!) { rotateAll(environmentId: $env, graceMinutes: 0) { __typename } }",
        {"env": ws.environments[env]},
    )
    assert await _code(ws.client, secret) == (401, "REVOKED")


async def test_the_endpoint_refuses_in_the_contracts_order(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """A key that fails every check, through HTTP (tests/test_properties.py checks the same
    order on the verifier itself): each answer is the first failing check's, and lifting that
    one shows the next."""
    key_id, secret = await ws.create_key(
        permissions=["a"],
        allowedIps=["198.51.100.7"],  # the test client is 203.0.113.10
        expiresAt=(clock.now() + timedelta(minutes=5)).isoformat(),
    )
    set_status = (
        "mutation($id: ID!, $s: KeyStatus!) { setStatus(id: $id, status: $s) { __typename } }"
    )
    await ws.q(set_status, {"id": key_id, "s": "DISABLED"})
    clock.advance(minutes=6)
    headers = {"X-Required-Permissions": "b"}
    assert await _code(ws.client, secret, headers=headers) == (401, "DISABLED")
    await ws.q(set_status, {"id": key_id, "s": "ENABLED"})
    assert await _code(ws.client, secret, headers=headers) == (401, "EXPIRED")
    await ws.q(
        "mutation($id: ID!, $at: DateTime) { updateKey(id: $id, input: {expiresAt: $at}) {"
        " __typename } }",
        {"id": key_id, "at": (clock.now() + timedelta(days=1)).isoformat()},
    )
    assert await _code(ws.client, secret, headers=headers) == (403, "IP_NOT_ALLOWED")
    await ws.q(
        "mutation($id: ID!) { setAllowedIps(id: $id, ips: []) { __typename } }", {"id": key_id}
    )
    assert await _code(ws.client, secret, headers=headers) == (403, "INSUFFICIENT_PERMISSIONS")
    assert await _code(ws.client, secret) == (200, "VALID")


async def test_client_side_id_needs_an_authorized_origin(ws: WorkspaceHandle) -> None:
    cs = ws.client_side_ids["production"]
    origin = {"Origin": "https://app.example.com"}
    assert await _code(ws.client, cs, headers=origin) == (403, "ORIGIN_NOT_ALLOWED")
    await ws.q(
        "mutation($e: ID!) { setAuthorizedOrigins(environmentId: $e,"
        ' origins: ["https://APP.example.com:443"]) { __typename } }',
        {"e": ws.environments["production"]},
    )
    assert await _code(ws.client, cs, headers=origin) == (200, "VALID")
    assert await _code(ws.client, cs) == (403, "ORIGIN_NOT_ALLOWED")
    evil = {"Origin": "https://evil.example.com"}
    assert await _code(ws.client, cs, headers=evil) == (403, "ORIGIN_NOT_ALLOWED")


@pytest.mark.parametrize(
    ("peer", "forwarded", "allowed"),
    [
        ("10.0.0.5", ["198.51.100.7"], True),  # trusted proxy: its XFF entry is the client
        ("10.0.0.5", ["198.51.100.7, 10.0.0.9"], True),  # skip trusted hops from the right
        ("10.0.0.5", ["203.0.113.66"], False),
        ("10.0.0.5", ["198.51.100.7, 203.0.113.66"], False),  # injected leftmost entry ignored
        ("10.0.0.5", ["198.51.100.7", "203.0.113.66"], False),  # several headers, in order
        ("203.0.113.66", ["198.51.100.7"], False),  # untrusted peer: its XFF is ignored
        ("198.51.100.7", ["203.0.113.66"], True),
    ],
)
async def test_client_ip_comes_from_forwarded_for_only_behind_a_trusted_proxy(
    app: Starlette, ws: WorkspaceHandle, peer: str, forwarded: list[str], allowed: bool
) -> None:
    key_id, secret = await ws.create_key()
    await ws.q(
        'mutation($id: ID!) { setAllowedIps(id: $id, ips: ["198.51.100.7"]) { __typename } }',
        {"id": key_id},
    )
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        headers = [("X-API-Key", secret)] + [("X-Forwarded-For", f) for f in forwarded]
        response = await client.get("/v1/verify", headers=headers)
    assert response.json()["code"] == ("VALID" if allowed else "IP_NOT_ALLOWED")


async def test_python_client_and_middleware(app: Starlette, ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key(permissions=["pdf.generate"])
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    client = KeyplaneClient("http://kp.test", transport=transport)
    result = await client.verify_async(secret, permissions=["pdf.generate"])
    assert result.valid and result.code == "VALID" and result.permissions == ["pdf.generate"]
    refused = await client.verify_async(secret, permissions=["pdf.delete"])
    assert (refused.valid, refused.code, refused.status_code) == (
        False,
        "INSUFFICIENT_PERMISSIONS",
        403,
    )

    async def protected(scope: Any, receive: Any, send: Any) -> None:
        key_id = scope["state"]["keyplane"].key_id.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": key_id})

    guarded = KeyplaneAuthMiddleware(
        protected, base_url="http://kp.test", required_permissions=["pdf.generate"], client=client
    )
    outer = httpx.ASGITransport(app=guarded)
    async with httpx.AsyncClient(transport=outer, base_url="http://svc.test") as svc:
        ok = await svc.get("/", headers={"X-API-Key": secret})
        assert ok.status_code == 200 and ok.text.startswith("key_")
        tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
        denied = await svc.get("/", headers={"X-API-Key": tampered})
        assert denied.status_code == 401 and denied.json()["code"] == "INVALID_KEY"
        missing = await svc.get("/")
        assert missing.status_code == 401 and missing.json()["code"] == "MISSING_KEY"
    await client.aclose()
