"""Edge cases of the `/v1/verify` adapter's own request reading (it reads raw ASGI messages)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.verifier import Code, KeyRecord, RequestFacts, judge
from tests.support import WorkspaceHandle


async def test_an_oversized_body_is_not_read_and_fails_closed(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    _, secret = await ws.create_key(permissions=["a"])
    limit = app.state.settings.max_body_bytes
    padded = json.dumps({"key": secret, "pad": "x" * limit})
    response = await ws.client.post("/v1/verify", content=padded)
    assert response.json()["code"] == "MISSING_KEY"  # the body was not read for a key
    # The same key in a header, with an oversized body that may name permissions: they cannot
    # be read, so they count as not held.
    response = await ws.client.post(
        "/v1/verify",
        headers={"X-API-Key": secret},
        content=json.dumps({"permissions": ["zzz"], "pad": "x" * limit}),
    )
    assert (response.status_code, response.json()["code"]) == (403, "INSUFFICIENT_PERMISSIONS")
    assert response.json()["message"] == (
        f"Required permissions could not be read: the request body is over {limit} bytes"
    )


SET_STATUS = "mutation($id: ID!, $s: KeyStatus!) { setStatus(id: $id, status: $s) { __typename } }"
SET_ALLOWED_IPS = (
    "mutation($id: ID!, $ips: [String!]!) { setAllowedIps(id: $id, ips: $ips) { __typename } }"
)

# (body, whether the key goes in a header, what the message must say was wrong)
UNREADABLE = [
    ("string", {"permissions": "b"}, False, "the body's permissions is a string"),
    ("nested", {"permissions": [["b"]]}, False, "the body's permissions list holds a list"),
    (
        "held-and-number",
        {"permissions": ["a", 5]},
        False,
        "the body's permissions list holds a number",
    ),
    ("object", {"permissions": {"b": True}}, False, "the body's permissions is an object"),
    ("not-json", b'{"permissions": ["b"],}', True, "the request body is not valid JSON"),
    ("not-an-object", b'["b"]', True, "the request body is a list, not a JSON object"),
]


@pytest.mark.parametrize(
    ("body", "in_header", "wrong"),
    [case[1:] for case in UNREADABLE],
    ids=[case[0] for case in UNREADABLE],
)
async def test_body_permissions_that_cannot_be_read_fail_closed(
    ws: WorkspaceHandle, body: dict[str, Any] | bytes, in_header: bool, wrong: str
) -> None:
    """A body that may name required permissions, but not as a list of strings, is refused as
    if they were not held (the key holds `a`): it is never a VALID answer that skipped them.
    The message names what was wrong, never the body's content."""
    _, secret = await ws.create_key(permissions=["a"])
    headers = {"X-API-Key": secret} if in_header else {}
    content = json.dumps({"key": secret, **body}).encode() if isinstance(body, dict) else body
    response = await ws.client.post("/v1/verify", headers=headers, content=content)
    answer = response.json()
    assert (response.status_code, answer["code"]) == (403, "INSUFFICIENT_PERMISSIONS")
    assert answer["valid"] is False
    assert answer["message"].startswith("Required permissions could not be read: " + wrong)
    assert secret not in response.text and '"b"' not in answer["message"]


async def test_readable_bodies_without_requirements_stay_valid(ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key(permissions=["a"])
    for body in (
        {"key": secret},
        {"key": secret, "permissions": None},
        {"key": secret, "permissions": []},
    ):
        response = await ws.client.post("/v1/verify", json=body)
        assert response.json()["code"] == "VALID", body
    response = await ws.client.post("/v1/verify", json={"key": secret, "permissions": ["a"]})
    assert response.json()["code"] == "VALID"
    response = await ws.client.post("/v1/verify", headers={"X-API-Key": secret}, content=b"")
    assert response.json()["code"] == "VALID"  # an empty body is no body


async def test_an_unreadable_body_is_refused_in_the_contracts_order(ws: WorkspaceHandle) -> None:
    """The key's own checks come first (steps 4-8), the unreadable requirements at step 9."""
    disabled_id, disabled = await ws.create_key()
    await ws.q(SET_STATUS, {"id": disabled_id, "s": "DISABLED"})
    fenced_id, fenced = await ws.create_key()
    await ws.q(SET_ALLOWED_IPS, {"id": fenced_id, "ips": ["198.51.100.7"]})
    for secret, expected in ((disabled, "DISABLED"), (fenced, "IP_NOT_ALLOWED")):
        response = await ws.client.post(
            "/v1/verify", headers={"X-API-Key": secret}, content=b"not json"
        )
        assert response.json()["code"] == expected


@pytest.mark.parametrize("authorization", ["Bearer ", "Bearer    ", "bearer\t"])
async def test_an_empty_bearer_falls_through_to_the_next_source(
    ws: WorkspaceHandle, authorization: str
) -> None:
    """CONTRACT §4: `Bearer`, else `X-API-Key`, else the body. An empty one is no key, so the next
    source is read (uvicorn strips trailing spaces off a header; the ASGI app must not depend on
    it)."""
    _, secret = await ws.create_key()
    response = await ws.client.get(
        "/v1/verify", headers={"Authorization": authorization, "X-API-Key": secret}
    )
    assert response.json()["code"] == "VALID"
    response = await ws.client.post(
        "/v1/verify",
        headers={"Authorization": authorization, "X-API-Key": "  "},
        json={"key": secret},
    )
    assert response.json()["code"] == "VALID"
    response = await ws.client.get("/v1/verify", headers={"Authorization": authorization})
    assert response.json()["code"] == "MISSING_KEY"


async def test_a_body_sent_in_chunks_is_read_whole(ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key(permissions=["a"])
    payload = json.dumps({"key": secret, "permissions": ["b"]}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 7):
            yield payload[i : i + 7]

    response = await ws.client.post("/v1/verify", content=chunks())
    assert response.status_code == 403
    assert response.json()["code"] == "INSUFFICIENT_PERMISSIONS"


async def test_an_overlong_token_is_refused_without_a_lookup(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    _, secret = await ws.create_key()
    misses = app.state.key_cache.misses
    response = await ws.client.get("/v1/verify", headers={"X-API-Key": secret + "A" * 5000})
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_KEY")
    assert app.state.key_cache.misses == misses


async def test_query_permissions_and_headers_agree(ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key(permissions=["pdf.read"])
    ok = await ws.client.get("/v1/verify?permissions=pdf.read", headers={"X-API-Key": secret})
    assert ok.json()["code"] == "VALID"
    refused = await ws.client.get(
        "/v1/verify?other=1&permissions=pdf.read,pdf.write", headers={"X-API-Key": secret}
    )
    assert refused.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    assert "pdf.write" in refused.json()["message"]
    # Sources add up: a caller's header cannot replace what a gateway put in the query.
    both = await ws.client.get(
        "/v1/verify?permissions=pdf.write",
        headers={"X-API-Key": secret, "X-Required-Permissions": "pdf.read"},
    )
    assert both.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    empty = await ws.client.get(
        "/v1/verify?permissions=pdf.write",
        headers={"X-API-Key": secret, "X-Required-Permissions": ","},
    )
    assert empty.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    body = await ws.client.post(
        "/v1/verify?permissions=pdf.write",
        headers={"X-API-Key": secret},
        json={"permissions": ["pdf.read"]},
    )
    assert body.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    agreed = await ws.client.post(
        "/v1/verify?permissions=pdf.read",
        headers={"X-API-Key": secret, "X-Required-Permissions": "pdf.read"},
        json={"permissions": ["pdf.read"]},
    )
    assert agreed.json()["code"] == "VALID"


async def test_answers_are_json_with_a_length_and_other_methods_are_refused(
    ws: WorkspaceHandle,
) -> None:
    _, secret = await ws.create_key()
    response = await ws.client.get("/v1/verify", headers={"Authorization": f"bearer {secret}"})
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["valid"] is True
    again = await ws.client.get("/v1/verify", headers={"Authorization": f"Bearer {secret}"})
    assert again.content == response.content  # the kept body is the same answer
    assert (await ws.client.put("/v1/verify")).status_code == 405
    assert (await ws.client.delete("/v1/verify")).status_code == 405
    head = await ws.client.head("/v1/verify", headers={"X-API-Key": secret})
    assert head.status_code == 200


async def test_a_client_that_disconnects_mid_body_gets_no_crash(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """The adapter stops reading when the client goes away, and answers as if no body came."""
    sent: list[dict[str, object]] = []
    messages = iter([{"type": "http.disconnect"}])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/verify",
        "raw_path": b"/v1/verify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"kp.test")],
        "client": ("198.18.220.1", 1),
        "server": ("127.0.0.1", 80),
        "app": app,
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["code"] == "MISSING_KEY"  # type: ignore[arg-type]


async def test_verify_answers_the_same_under_a_root_path(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """`/v1/verify` is answered ahead of Starlette's router; an app served under a root path
    (uvicorn `--root-path`) goes through the router instead, and answers the same."""
    _, secret = await ws.create_key(permissions=["a"])
    direct = await ws.client.get("/v1/verify", headers={"X-API-Key": secret})
    transport = httpx.ASGITransport(app=app, client=("203.0.113.10", 40000), root_path="/kp")
    async with httpx.AsyncClient(transport=transport, base_url="http://kp") as client:
        mounted = await client.get("/kp/v1/verify", headers={"X-API-Key": secret})
        assert (mounted.status_code, mounted.content) == (200, direct.content)
        refused = await client.get("/kp/v1/verify?permissions=b", headers={"X-API-Key": secret})
        assert refused.json()["code"] == "INSUFFICIENT_PERMISSIONS"
        assert (await client.put("/kp/v1/verify")).status_code == 405


async def test_text_that_is_not_valid_unicode_is_refused_and_the_flush_still_writes(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """JSON may escape a lone surrogate (`"\\ud800"`), which no UTF-8 text can hold. As a key it
    is malformed (not a 500); as a required permission it is unreadable. Either way nothing the
    denial log cannot store gets into it, so later flushes keep writing."""
    key_id, secret = await ws.create_key(permissions=["a"])
    response = await ws.client.post(
        "/v1/verify", content=b'{"key": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_KEY")
    response = await ws.client.post(
        "/v1/verify", content=json.dumps({"key": secret, "permissions": ["\ud800"]}).encode()
    )
    assert (response.status_code, response.json()["code"]) == (403, "INSUFFICIENT_PERMISSIONS")
    assert "not valid Unicode" in response.json()["message"]
    assert (await ws.client.get("/v1/verify", headers={"X-API-Key": secret})).json()["valid"]
    usage = app.state.usage
    assert await usage.flush()
    assert usage.pending_requests == 0 and usage.pending_denials == 0
    data = await ws.q(
        "query($id: ID!) { key(id: $id) { usage { totalRequests } } }", {"id": key_id}
    )
    assert data["key"]["usage"]["totalRequests"] == 2


def test_a_missing_permission_is_shown_as_valid_utf8() -> None:
    record = KeyRecord(
        key_id="key_x",
        key_pk=1,
        key_type="SERVER",
        workspace_pk=1,
        workspace_id="ws_x",
        environment_pk=1,
        environment_id="env_x",
        status="ENABLED",
        permissions=frozenset(),
        permission_list=(),
        allowed_networks=(),
        authorized_origins=frozenset(),
        expires_at=None,
        grace_ends_at=None,
    )
    facts = RequestFacts(token="t", client_ip=None, origin=None, required=("\ud800",))
    decision = judge(facts, record, datetime.now(UTC))
    assert decision.code is Code.INSUFFICIENT_PERMISSIONS
    decision.message.encode("utf-8")  # storable; the surrogate is shown escaped
    assert "\\ud800" in decision.message


async def test_a_nul_asked_for_is_shown_escaped_and_the_denial_log_takes_it(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """PostgreSQL text holds no NUL: echoed into the message, `?permissions=pdf.%00x` failed
    every flush that held its denial, with every other denial of that batch. A permission no key
    could hold is now shown escaped, as `ascii()` writes it."""
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    # An IP of its own: the default peer's denials may be folded past the per-IP rate.
    transport = httpx.ASGITransport(app=app, client=("198.18.250.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        response = await client.get(
            "/v1/verify?permissions=pdf.read,pdf.%00x,caf%C3%A9", headers={"X-API-Key": secret}
        )
    assert (response.status_code, response.json()["code"]) == (403, "INSUFFICIENT_PERMISSIONS")
    message = response.json()["message"]
    assert message == "Missing required permissions: pdf.\\x00x, caf\\xe9"
    usage = app.state.usage
    assert await usage.flush()
    assert usage.pending_denials == 0
    data = await ws.q(
        "query($k: ID) { denials(keyId: $k) { edges { node { message } } } }", {"k": key_id}
    )
    assert [e["node"]["message"] for e in data["denials"]["edges"]] == [message]


async def test_repeated_permission_headers_each_add_requirements(ws: WorkspaceHandle) -> None:
    """Two `X-Required-Permissions` lines are one list (RFC 9110 5.3): the second no longer
    replaces the first, so a caller cannot undo a gateway's requirement by adding a line."""
    _, secret = await ws.create_key(permissions=["pdf.read"])
    lines = [
        ("X-API-Key", secret),
        ("X-Required-Permissions", "admin.all"),
        ("X-Required-Permissions", "pdf.read"),
    ]
    response = await ws.client.get("/v1/verify", headers=lines)
    assert response.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    assert response.json()["message"] == "Missing required permissions: admin.all"
    lines[1] = ("X-Required-Permissions", "pdf.read")
    assert (await ws.client.get("/v1/verify", headers=lines)).json()["code"] == "VALID"


@pytest.mark.parametrize("permission", ["pdf.read\n", "pdf.read\n\n", "\npdf.read"])
async def test_a_permission_is_matched_whole(ws: WorkspaceHandle, permission: str) -> None:
    """`$` also matches before a final newline: "pdf.read\\n" was accepted as a permission."""
    data = await ws.q(
        """mutation($input: CreateKeyInput!) { createKey(input: $input) {
             __typename ... on Error { message } } }""",
        {
            "input": {
                "environmentId": ws.environments["production"],
                "name": "k",
                "permissions": [permission],
            }
        },
    )
    assert data["createKey"]["__typename"] == "ValidationFailedError", data


async def test_a_body_key_is_read_as_a_header_key_is(ws: WorkspaceHandle) -> None:
    """Same checks whichever way the key arrives: a header's value comes without surrounding
    whitespace, so the body's is stripped too (it was INVALID_KEY)."""
    _, secret = await ws.create_key()
    for key in (f" {secret}", f"{secret}\n", f"\t{secret} "):
        body = await ws.client.post("/v1/verify", json={"key": key})
        header = await ws.client.get("/v1/verify", headers={"X-API-Key": key.strip()})
        assert body.json()["code"] == header.json()["code"] == "VALID"
    blank = await ws.client.post("/v1/verify", json={"key": "   "})
    assert (blank.status_code, blank.json()["code"]) == (401, "MISSING_KEY")
