"""Relay pagination walks every key once; the CLI prints exactly what the contract fixes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.applications import Starlette

from app.services.keys import MAX_ROW_ID
from models import Environment, ManagementToken, Member, Role, Workspace
from tests.conftest import BACKEND
from tests.support import WorkspaceHandle, unique_name

ROOT = Path(__file__).resolve().parent.parent


async def test_pages_walk_every_key_once(ws: WorkspaceHandle) -> None:
    created = {(await ws.create_key())[0] for _ in range(7)}
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        data = await ws.q(
            """query($after: String) { keys(type: SERVER, first: 3, after: $after) {
                 totalCount pageInfo { hasNextPage endCursor } edges { cursor node { id } } } }""",
            {"after": after},
        )
        page = data["keys"]
        assert page["totalCount"] == 7
        seen += [edge["node"]["id"] for edge in page["edges"]]
        pages += 1
        if not page["pageInfo"]["hasNextPage"]:
            break
        assert page["pageInfo"]["endCursor"] == page["edges"][-1]["cursor"]
        after = page["pageInfo"]["endCursor"]
    assert pages == 3
    assert len(seen) == 7 and set(seen) == created


async def test_an_explicit_null_takes_the_contracts_default(ws: WorkspaceHandle) -> None:
    """The contract's `first: Int = 50` and `type: KeyType = SERVER` are nullable; a null is
    the default, as a dashboard that forwards an unset variable sends it."""
    data = await ws.q(
        """mutation($input: CreateKeyInput!) { createKey(input: $input) {
             __typename ... on CreateKeySuccess { key { type } } } }""",
        {"input": {"environmentId": ws.environments["production"], "name": "k", "type": None}},
    )
    assert data["createKey"] == {"__typename": "CreateKeySuccess", "key": {"type": "SERVER"}}
    for _ in range(55):  # 56 audit events with the create above: more than one default page
        await ws.create_key()
    data = await ws.q(
        """query($first: Int) { keys(type: SERVER, first: $first) { totalCount edges { cursor } }
             auditLog(first: $first) { totalCount edges { cursor } }
             denials(first: $first) { totalCount edges { cursor } } }""",
        {"first": None},
    )
    assert data["keys"]["totalCount"] == 56 and len(data["keys"]["edges"]) == 50
    assert data["auditLog"]["totalCount"] >= 56 and len(data["auditLog"]["edges"]) == 50
    assert data["denials"] == {"totalCount": 0, "edges": []}


def _cursor(kind: str, number: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{number}".encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("field", "kind"),
    [("keys(type: SERVER", "key"), ("auditLog(", "evt"), ("denials(", "den")],
)
@pytest.mark.parametrize("number", [1, 10**30, "١٢٣", "-1", ""])
async def test_a_cursor_that_cannot_hold_a_row_id_is_a_typed_error(
    ws: WorkspaceHandle, field: str, kind: str, number: int | str
) -> None:
    """Past its column's range (INTEGER or BIGINT) the database would refuse the number (it
    was INTERNAL_SERVER_ERROR); digits other than ASCII are not a row ID either."""
    if isinstance(number, int):  # so far past the column's largest ID
        number = str(MAX_ROW_ID[kind] + number)
    cursor = _cursor(kind, number)
    separator = "" if field.endswith("(") else ", "
    response = await ws.client.post(
        "/graphql",
        json={
            "query": f"query($a: String) {{ {field}{separator}first: 2, after: $a) "
            "{ edges { cursor } } }",
            "variables": {"a": cursor},
        },
        headers={"Authorization": f"Bearer {ws.token}"},
    )
    [error] = response.json()["errors"]
    assert error["extensions"]["code"] == "VALIDATION_FAILED", error
    assert cursor in error["message"]


async def test_the_largest_row_id_is_a_cursor_past_every_row(ws: WorkspaceHandle) -> None:
    await ws.create_key()
    data = await ws.q(
        "query($a: String) { keys(type: SERVER, first: 5, after: $a) { edges { cursor } } }",
        {"a": _cursor("key", str(MAX_ROW_ID["key"]))},
    )
    assert len(data["keys"]["edges"]) == 1  # every row ID is below it


def _keyplane(
    args: list[str], url: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "KEYPLANE_DATABASE_URL": url, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(BACKEND != "sqlite", reason="CLI runs against its own SQLite file")
def test_bootstrap_prints_one_json_object_and_reruns_mint_another_token(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'cli.sqlite3'}"
    assert _keyplane(["migrate"], url).returncode == 0
    first = _keyplane(
        ["bootstrap", "--workspace", "acme", "--plan", "FREE", "--key-prefix", "acme"], url
    )
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert set(out) == {"workspaceId", "token"} and out["workspaceId"].startswith("ws_")
    second = json.loads(_keyplane(["bootstrap", "--workspace", "acme"], url).stdout)
    assert second["workspaceId"] == out["workspaceId"] and second["token"] != out["token"]
    owner = _keyplane(
        ["bootstrap", "--workspace", "acme", "--email", "o@example.com"], url, "a long password\n"
    )
    assert owner.returncode == 0 and "a long password" not in owner.stdout + owner.stderr


async def test_bootstrap_whose_owner_is_refused_writes_nothing(
    app: Starlette, database_url: str
) -> None:
    """On either database: the owner's email belongs to another workspace, so exit 2 and no
    workspace, environment, role or token of the new one is left."""
    first_name, second_name = unique_name(), unique_name()
    email = f"{first_name}@example.com"
    args = ["bootstrap", "--email", email, "--workspace"]
    first = await asyncio.to_thread(_keyplane, [*args, first_name], database_url, "pw one long\n")
    assert first.returncode == 0, first.stderr
    environments, roles, tokens = (
        await Environment.all().count(),
        await Role.all().count(),
        await ManagementToken.all().count(),
    )
    refused = await asyncio.to_thread(
        _keyplane, [*args, second_name], database_url, "pw two long\n"
    )
    assert refused.returncode == 2 and email in refused.stderr and refused.stdout == ""
    assert not await Workspace.exists(name=second_name)
    assert (
        await Environment.all().count(),
        await Role.all().count(),
        await ManagementToken.all().count(),
    ) == (environments, roles, tokens)
    assert await Member.filter(email=email).count() == 1


@pytest.mark.skipif(BACKEND != "sqlite", reason="CLI runs against its own SQLite file")
@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["bootstrap", "--workspace", "w", "--plan", "GOLD"], {}, "GOLD"),
        (["bootstrap", "--workspace", "w", "--key-prefix", "Bad1"], {}, "Bad1"),
        (["serve"], {"KEYPLANE_TRUSTED_PROXIES": "*"}, "KEYPLANE_TRUSTED_PROXIES"),
        (["serve"], {"KEYPLANE_CORS_ORIGINS": "*"}, "KEYPLANE_CORS_ORIGINS"),
        (["serve", "--workers", "2"], {}, "PostgreSQL"),
    ],
)
def test_refusals_exit_non_zero_saying_why(
    tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    result = _keyplane(args, f"sqlite://{tmp_path / 'cli.sqlite3'}", **env)
    assert result.returncode != 0
    assert said in result.stderr
