"""Key lifecycle rules: plan limits, grace values, rotation, rotateAll, typed bad input."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from models import Plan
from tests.conftest import make_workspace
from tests.support import OffsetClock, WorkspaceHandle

CREATE = """mutation($i: CreateKeyInput!) { createKey(input: $i) { __typename
  ... on CreateKeySuccess { key { id } } ... on KeyLimitReachedError { limit }
  ... on Error { code message } } }"""
ROTATE = """mutation($id: ID!, $g: Int!) { rotateKey(id: $id, graceMinutes: $g) { __typename
  ... on RotateKeySuccess { secret
    oldKey { id status revokedAt graceEndsAt rotatedToId }
    newKey { id type status permissions allowedIps expiresAt rotatedFromId role { id }
             environment { id } } }
  ... on Error { code message } } }"""

LIMITS = [
    (Plan.FREE, 1),
    (Plan.STARTER, 2),
    (Plan.GROWTH, 5),
    (Plan.SCALE, 10),
    (Plan.SCALE_BUSINESS, 25),
]


@pytest.mark.parametrize(("plan", "limit"), LIMITS)
async def test_plan_limits_count_active_keys_only(
    client: httpx.AsyncClient, clock: OffsetClock, plan: Plan, limit: int
) -> None:
    ws = await make_workspace(client, clock, plan=plan)
    ids = [(await ws.create_key())[0] for _ in range(limit)]
    refused = await ws.q(CREATE, {"i": {"environmentId": ws.environments["staging"], "name": "x"}})
    assert refused["createKey"]["__typename"] == "KeyLimitReachedError"
    assert refused["createKey"]["limit"] == limit
    assert plan.value in refused["createKey"]["message"]
    # Rotation does not count; revoking frees a slot; client-side IDs never count.
    rotated = await ws.q(ROTATE, {"id": ids[0], "g": 0})
    assert rotated["rotateKey"]["__typename"] == "RotateKeySuccess"
    newest = rotated["rotateKey"]["newKey"]["id"]
    await ws.q(f'mutation {{ revoke(id: "{newest}") {{ __typename }} }}')
    again = await ws.q(CREATE, {"i": {"environmentId": ws.environments["staging"], "name": "y"}})
    assert again["createKey"]["__typename"] == "CreateKeySuccess"
    counts = await ws.q("{ workspace { keyLimit activeKeyCount } }")
    assert counts["workspace"] == {"keyLimit": limit, "activeKeyCount": limit}


async def test_enterprise_plan_is_unlimited(ws: WorkspaceHandle) -> None:
    for _ in range(30):
        await ws.create_key()
    data = await ws.q("{ workspace { keyLimit activeKeyCount } }")
    assert data["workspace"] == {"keyLimit": None, "activeKeyCount": 30}


@pytest.mark.parametrize("grace", [0, 15, 30, 60, 240, 720, 1440])
async def test_every_allowed_grace_value_sets_grace_end(
    ws: WorkspaceHandle, clock: OffsetClock, grace: int
) -> None:
    key_id, _ = await ws.create_key()
    data = await ws.q(
        f'mutation {{ revoke(id: "{key_id}", graceMinutes: {grace}) {{'
        " ... on RevokeSuccess { key { status revokedAt graceEndsAt } } } }"
    )
    key = data["revoke"]["key"]
    assert key["status"] == "REVOKED"
    if grace == 0:
        assert key["graceEndsAt"] is None
    else:
        from datetime import datetime

        ends = datetime.fromisoformat(key["graceEndsAt"])
        revoked = datetime.fromisoformat(key["revokedAt"])
        assert ends - revoked == timedelta(minutes=grace)


@pytest.mark.parametrize("grace", [-1, 1, 14, 45, 1441, 100000])
async def test_other_grace_values_are_refused_naming_them(ws: WorkspaceHandle, grace: int) -> None:
    key_id, _ = await ws.create_key()
    data = await ws.q(
        f'mutation {{ a: revoke(id: "{key_id}", graceMinutes: {grace}) {{ ...E }}'
        f' b: rotateKey(id: "{key_id}", graceMinutes: {grace}) {{ ...E }} }}'
        " fragment E on Error { code message }"
    )
    for result in (data["a"], data["b"]):
        assert result["code"] == "VALIDATION_FAILED"
        assert f"graceMinutes={grace}" in result["message"]


async def test_revoked_key_cannot_be_reenabled_or_revoked_again(ws: WorkspaceHandle) -> None:
    key_id, _ = await ws.create_key()
    await ws.q(f'mutation {{ revoke(id: "{key_id}") {{ __typename }} }}')
    data = await ws.q(
        f'mutation {{ a: setStatus(id: "{key_id}", status: ENABLED) {{ ... on Error {{ code }} }}'
        f' b: revoke(id: "{key_id}") {{ ... on Error {{ code }} }}'
        f' c: rotateKey(id: "{key_id}") {{ ... on Error {{ code }} }} }}'
    )
    assert [data[k]["code"] for k in "abc"] == ["INVALID_STATE"] * 3


async def test_rotation_keeps_the_old_keys_settings(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    role = await ws.q(
        'mutation { createRole(name: "ops", permissions: ["ops.*"]) {'
        " ... on CreateRoleSuccess { role { id } } } }"
    )
    role_id = role["createRole"]["role"]["id"]
    expires = (clock.now() + timedelta(days=3)).isoformat()
    key_id, old_secret = await ws.create_key(
        "staging",
        type="MOBILE",
        permissions=["a.b", "c.*"],
        roleId=role_id,
        allowedIps=["10.1.0.0/16"],
        expiresAt=expires,
    )
    data = await ws.q(ROTATE, {"id": key_id, "g": 60})
    result = data["rotateKey"]
    old, new = result["oldKey"], result["newKey"]
    assert result["secret"] != old_secret and result["secret"].startswith("kp_mob_")
    assert old["status"] == "REVOKED" and old["rotatedToId"] == new["id"]
    assert new["rotatedFromId"] == key_id
    assert (new["type"], new["status"]) == ("MOBILE", "ENABLED")
    assert new["permissions"] == ["a.b", "c.*"] and new["allowedIps"] == ["10.1.0.0/16"]
    assert new["role"]["id"] == role_id
    assert new["environment"]["id"] == ws.environments["staging"]
    assert new["expiresAt"] is not None


async def test_rotate_all_rotates_only_live_server_keys_of_one_environment(
    ws: WorkspaceHandle,
) -> None:
    server_a, _ = await ws.create_key("production")
    server_b, _ = await ws.create_key("production")
    revoked, _ = await ws.create_key("production")
    await ws.q(f'mutation {{ revoke(id: "{revoked}") {{ __typename }} }}')
    mobile, _ = await ws.create_key("production", type="MOBILE")
    elsewhere, _ = await ws.create_key("staging")
    data = await ws.q(
        """mutation($e: ID!) { rotateAll(environmentId: $e) { __typename
             ... on RotateAllSuccess {
               rotated { secret oldKey { id status } newKey { id } } } } }""",
        {"e": ws.environments["production"]},
    )
    rotated = data["rotateAll"]["rotated"]
    assert sorted(r["oldKey"]["id"] for r in rotated) == sorted([server_a, server_b])
    assert all(r["oldKey"]["status"] == "REVOKED" and r["secret"] for r in rotated)
    untouched = await ws.q(
        f'{{ m: key(id: "{mobile}") {{ status }} s: key(id: "{elsewhere}") {{ status }} }}'
    )
    assert untouched == {"m": {"status": "ENABLED"}, "s": {"status": "ENABLED"}}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"name": "x" * 101}, "101 characters"),
        ({"name": "   "}, "must not be empty"),
        ({"permissions": ["Bad Permission"]}, "'Bad Permission'"),
        ({"permissions": ["a..b"]}, "'a..b'"),
        ({"allowedIps": ["10.0.0.300"]}, "'10.0.0.300'"),
        ({"allowedIps": ["10.0.0.1/8"]}, "did you mean 10.0.0.0/8"),
        ({"allowedIps": ["not-an-ip"]}, "'not-an-ip'"),
        ({"expiresAt": "2001-01-01T00:00:00+00:00"}, "2001-01-01"),
        ({"type": "CLIENT_SIDE"}, "CLIENT_SIDE"),
        ({"roleId": "role_000000000000000000000A"}, "role_000000000000000000000A"),
        ({"roleId": "nope"}, "'nope'"),
    ],
)
async def test_bad_create_input_gets_a_typed_error_naming_it(
    ws: WorkspaceHandle, fields: dict, named: str
) -> None:
    data = await ws.q(
        CREATE, {"i": {"environmentId": ws.environments["production"], "name": "k", **fields}}
    )
    result = data["createKey"]
    assert result["code"] in {"VALIDATION_FAILED", "NOT_FOUND"}, result
    assert named in result["message"], result


@pytest.mark.parametrize(
    "origin", ["*", "https://a.example.com/path", "ftp://a.example.com", "https://u:p@a.com", ""]
)
async def test_bad_origins_are_refused_naming_them(ws: WorkspaceHandle, origin: str) -> None:
    data = await ws.q(
        """mutation($e: ID!, $o: [String!]!) { setAuthorizedOrigins(environmentId: $e,
             origins: $o) { ... on Error { code message } } }""",
        {"e": ws.environments["production"], "o": [origin]},
    )
    assert data["setAuthorizedOrigins"]["code"] == "VALIDATION_FAILED"
    if origin:
        assert repr(origin) in data["setAuthorizedOrigins"]["message"]


async def test_other_workspaces_ids_are_not_found_and_nothing_changes(
    ws: WorkspaceHandle, other_ws: WorkspaceHandle
) -> None:
    theirs, _ = await other_ws.create_key()
    data = await ws.q(f'{{ key(id: "{theirs}") {{ id }} }}')
    assert data["key"] is None
    data = await ws.q(
        f'mutation {{ a: revoke(id: "{theirs}") {{ ... on Error {{ code }} }}'
        f' b: deleteKey(id: "{theirs}") {{ ... on Error {{ code }} }}'
        f' c: setAllowedIps(id: "{theirs}", ips: []) {{ ... on Error {{ code }} }} }}'
    )
    assert [data[k]["code"] for k in "abc"] == ["NOT_FOUND"] * 3
    still = await other_ws.q(f'{{ key(id: "{theirs}") {{ status }} }}')
    assert still["key"]["status"] == "ENABLED"
    listed = await ws.q("{ keys(first: 100) { edges { node { id } } } }")
    assert theirs not in {e["node"]["id"] for e in listed["keys"]["edges"]}
