"""`/graphql` and text that is not valid Unicode: a JSON `\\ud800` escape decodes to half a
surrogate pair, which no database, password hash or response can hold. It used to reach the
resolvers and fail there (INTERNAL_SERVER_ERROR, a logged trace); now the request is refused
before any of that, naming the place and never the value."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import WorkspaceHandle

SEARCH = "query($s: String) { keys(search: $s) { totalCount } }"
LOGIN = "mutation($e: String!, $p: String!) { login(email: $e, password: $p) { __typename } }"
CREATE = """mutation($input: CreateKeyInput!) { createKey(input: $input) {
    __typename ... on CreateKeySuccess { key { name } } } }"""


async def _post(ws: WorkspaceHandle, payload: dict[str, Any], *, auth: bool = True) -> Any:
    headers = {"content-type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {ws.token}"
    # json.dumps writes "\ud800" as the six ASCII characters of its escape, as a client would.
    return await ws.client.post("/graphql", content=json.dumps(payload).encode(), headers=headers)


@pytest.mark.parametrize(
    ("case", "auth", "place"),
    [
        ({"query": SEARCH, "variables": {"s": "ab\ud800"}}, True, "request.variables.s"),
        (
            {"query": LOGIN, "variables": {"e": "a@example.com", "p": "secret\udfff"}},
            False,
            "request.variables.p",
        ),
        ({"query": '{ keys(search: "\ud800") { totalCount } }'}, True, "request.query"),
        (
            {"query": SEARCH, "variables": {"\ud800": "x"}},
            True,
            "request.variables (an object key)",
        ),
        ({"query": SEARCH, "operationName": "\udc00"}, True, "request.operationName"),
    ],
)
async def test_lone_surrogates_are_refused_naming_their_place(
    ws: WorkspaceHandle, case: dict[str, Any], auth: bool, place: str
) -> None:
    response = await _post(ws, case, auth=auth)
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert error["extensions"]["code"] == "VALIDATION_FAILED"
    assert error["message"] == f"{place} is not valid Unicode text (a lone surrogate)"
    assert "secret" not in response.text


async def test_create_key_with_a_lone_surrogate_writes_nothing(ws: WorkspaceHandle) -> None:
    before = (await _post(ws, {"query": SEARCH})).json()["data"]["keys"]["totalCount"]
    env = ws.environments["production"]
    refused = await _post(
        ws, {"query": CREATE, "variables": {"input": {"environmentId": env, "name": "k\ud800"}}}
    )
    assert refused.status_code == 400
    assert "request.variables.input.name" in refused.json()["errors"][0]["message"]
    after = (await _post(ws, {"query": SEARCH})).json()["data"]["keys"]["totalCount"]
    assert after == before


async def test_text_beyond_ascii_is_still_accepted(ws: WorkspaceHandle) -> None:
    name = "ключ 🔑 clé"  # an astral character too, as a surrogate pair in the JSON
    env = ws.environments["production"]
    created = await _post(
        ws, {"query": CREATE, "variables": {"input": {"environmentId": env, "name": name}}}
    )
    assert created.status_code == 200, created.text
    assert created.json()["data"]["createKey"]["key"]["name"] == name
    found = await _post(ws, {"query": SEARCH, "variables": {"s": "ключ 🔑"}})
    assert found.json()["data"]["keys"]["totalCount"] == 1
