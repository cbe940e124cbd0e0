"""Rotation hygiene: per-environment policies, rotationDueAt/rotationDue, the rotationDue filter."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from models import ApiKey
from tests.support import OffsetClock, WorkspaceHandle

KEY_FIELDS = "{ id rotationDueAt rotationDue createdAt }"
SET_POLICY = """mutation($e: ID!, $d: Int!) { setRotationPolicy(environmentId: $e, days: $d) {
  __typename ... on SetRotationPolicySuccess { environment { name rotationPolicyDays } }
  ... on Error { code message } } }"""


async def _age(key_id: str, clock: OffsetClock, days: int) -> None:
    """Backdate a key instead of moving the shared clock by months."""
    await ApiKey.filter(public_id=key_id).update(created_at=clock.now() - timedelta(days=days))


async def test_default_policies_are_90_90_180_days(ws: WorkspaceHandle) -> None:
    data = await ws.q("{ environments { name rotationPolicyDays } }")
    policies = {e["name"]: e["rotationPolicyDays"] for e in data["environments"]}
    assert policies == {"production": 90, "staging": 90, "development": 180}


async def test_rotation_due_at_follows_the_environment_policy(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key("development")
    data = await ws.q(f'{{ key(id: "{key_id}") {KEY_FIELDS} }}')
    created = datetime.fromisoformat(data["key"]["createdAt"])
    due = datetime.fromisoformat(data["key"]["rotationDueAt"])
    assert due - created == timedelta(days=180)
    assert data["key"]["rotationDue"] is False
    await _age(key_id, clock, 181)
    data = await ws.q(f'{{ key(id: "{key_id}") {KEY_FIELDS} }}')
    assert data["key"]["rotationDue"] is True


async def test_keys_can_be_filtered_by_rotation_due(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    old_prod, _ = await ws.create_key("production")
    fresh_prod, _ = await ws.create_key("production")
    old_dev, _ = await ws.create_key("development")
    await _age(old_prod, clock, 91)
    await _age(old_dev, clock, 91)  # development allows 180 days: not due yet
    due = await ws.q("{ keys(rotationDue: true) { totalCount edges { node { id } } } }")
    assert [e["node"]["id"] for e in due["keys"]["edges"]] == [old_prod]
    not_due = await ws.q("{ keys(rotationDue: false, type: SERVER) { edges { node { id } } } }")
    assert {e["node"]["id"] for e in not_due["keys"]["edges"]} == {fresh_prod, old_dev}


async def test_revoked_keys_and_client_side_ids_are_never_due(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key("production")
    await _age(key_id, clock, 400)
    await ws.q(f'mutation {{ revoke(id: "{key_id}") {{ __typename }} }}')
    await ApiKey.filter(
        type="CLIENT_SIDE", environment__public_id=ws.environments["staging"]
    ).update(created_at=clock.now() - timedelta(days=400))
    due = await ws.q("{ keys(rotationDue: true) { totalCount } }")
    assert due["keys"]["totalCount"] == 0
    data = await ws.q(f'{{ key(id: "{key_id}") {{ rotationDueAt rotationDue }} }}')
    assert data["key"] == {"rotationDueAt": None, "rotationDue": False}


async def test_policy_is_editable_and_applies_at_once(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key("production")
    await _age(key_id, clock, 10)
    data = await ws.q(SET_POLICY, {"e": ws.environments["production"], "d": 7})
    assert data["setRotationPolicy"]["environment"] == {
        "name": "production",
        "rotationPolicyDays": 7,
    }
    data = await ws.q(f'{{ key(id: "{key_id}") {{ rotationDue }} }}')
    assert data["key"]["rotationDue"] is True


@pytest.mark.parametrize("days", [0, -1, 3651])
async def test_out_of_range_policy_is_refused_naming_the_value(
    ws: WorkspaceHandle, days: int
) -> None:
    data = await ws.q(SET_POLICY, {"e": ws.environments["production"], "d": days})
    assert data["setRotationPolicy"]["code"] == "VALIDATION_FAILED"
    assert f"days={days}" in data["setRotationPolicy"]["message"]


async def test_other_workspaces_environment_is_not_found(
    ws: WorkspaceHandle, other_ws: WorkspaceHandle
) -> None:
    data = await ws.q(SET_POLICY, {"e": other_ws.environments["production"], "d": 30})
    assert data["setRotationPolicy"]["code"] == "NOT_FOUND"
