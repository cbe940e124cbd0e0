"""GraphQL abuse limits: depth, aliases, tokens, page-weighted cost, page size, body size,
batching, error masking, and the switches for introspection and GraphiQL."""

from __future__ import annotations

import logging

import httpx
import pytest
import strawberry
from starlette.applications import Starlette

from app.main import create_app
from app.settings import Settings
from resolvers.cost import MAX_QUERY_COST, QueryCostRule
from resolvers.schema import KeyplaneSchema
from tests.support import WorkspaceHandle

KEY_FIELDS = "id name prefix status permissions allowedIps createdAt lastUsedAt expiresAt"


async def _errors(ws: WorkspaceHandle, query: str) -> list[dict]:
    body = await ws.raw(query)
    assert body.get("errors"), body
    errors: list[dict] = body["errors"]
    return errors


async def test_deep_queries_are_refused(ws: WorkspaceHandle) -> None:
    deep = "{ keys { edges { node { environment { name } } } } }"
    assert "errors" not in await ws.raw(deep)
    nested = "{ keys { edges { node { " + "environment { " * 12 + "name" + " }" * 12 + " } } } }"
    errors = await _errors(ws, nested)
    assert "depth" in errors[0]["message"].lower()


async def test_too_many_aliases_are_refused(ws: WorkspaceHandle) -> None:
    query = "{ " + " ".join(f"a{i}: workspace {{ id }}" for i in range(40)) + " }"
    errors = await _errors(ws, query)
    assert "alias" in errors[0]["message"].lower()


async def test_too_many_tokens_are_refused(ws: WorkspaceHandle) -> None:
    query = "{ workspace { " + " ".join(["id"] * 2500) + " } }"
    errors = await _errors(ws, query)
    assert "token" in errors[0]["message"].lower()


async def test_query_cost_counts_page_sizes(ws: WorkspaceHandle) -> None:
    page = f"keys(first: 100) {{ edges {{ node {{ {KEY_FIELDS} }} }} }}"
    assert "errors" not in await ws.raw("{ " + page + " }")
    costly = "{ " + " ".join(f"p{i}: {page}" for i in range(12)) + " }"
    errors = await _errors(ws, costly)
    assert errors[0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"
    assert str(MAX_QUERY_COST) in errors[0]["message"]


async def test_query_cost_sees_through_fragments(ws: WorkspaceHandle) -> None:
    fragment = f"fragment F on ApiKey {{ {KEY_FIELDS} }}"
    page = "keys(first: 100) { edges { node { ...F } } }"
    costly = "{ " + " ".join(f"p{i}: {page}" for i in range(12)) + " } " + fragment
    errors = await _errors(ws, costly)
    assert errors[0]["extensions"]["code"] == "QUERY_TOO_COMPLEX"


@pytest.mark.parametrize("first", [101, 1000, -1])
async def test_page_size_is_capped(ws: WorkspaceHandle, first: int) -> None:
    errors = await _errors(ws, f"{{ keys(first: {first}) {{ totalCount }} }}")
    assert errors[0]["extensions"]["code"] == "VALIDATION_FAILED"
    assert f"first={first}" in errors[0]["message"]


async def test_oversized_body_gets_413(ws: WorkspaceHandle) -> None:
    big = "{ workspace { id } }" + " " * (70 * 1024)
    response = await ws.client.post(
        "/graphql", json={"query": big}, headers={"Authorization": f"Bearer {ws.token}"}
    )
    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_batched_operations_are_refused(ws: WorkspaceHandle) -> None:
    batch = [{"query": "{ workspace { id } }"}] * 5
    response = await ws.client.post(
        "/graphql", json=batch, headers={"Authorization": f"Bearer {ws.token}"}
    )
    assert response.status_code == 400
    assert "workspace" not in response.text


async def test_unexpected_errors_are_masked() -> None:
    @strawberry.type
    class Query:
        @strawberry.field
        def broken(self) -> str:
            raise RuntimeError("SELECT secret FROM api_keys -- internal detail")

    schema = KeyplaneSchema(query=Query)
    result = await schema.execute("{ broken }")
    assert result.errors is not None
    error = result.errors[0]
    assert error.message == "Internal server error"
    assert error.extensions == {"code": "INTERNAL_SERVER_ERROR"}
    assert "SELECT" not in str(error.formatted)


@pytest.mark.parametrize(
    "query",
    ["{ }", "query { }", "{ workspace { } }", "{ ...F } fragment F on Query { }", "{ ... { } }"],
)
async def test_an_empty_selection_set_is_a_syntax_error(ws: WorkspaceHandle, query: str) -> None:
    """graphql-core 3.3 parses a selection set that selects nothing, and Strawberry's depth
    limiter then failed on it with a raw ValueError ("max() arg is an empty sequence")."""
    [error] = await _errors(ws, query)
    assert error["message"] == "Syntax Error: a selection set must select at least one field."
    assert error["locations"]  # where it is
    assert "max()" not in str(error)


async def test_an_unexpected_error_before_execution_is_masked_and_logged(
    ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error raised while the document is validated (here, a bug in the cost rule) never
    reached the masking extension, which saw the operation's result only: it came back to the
    client with its own message."""

    detail = " ".join(["SELECT", "secret", "FROM", "api_keys"])  # in no source line

    def broken(self: object, context: object) -> None:
        raise RuntimeError(detail)

    monkeypatch.setattr(QueryCostRule, "__init__", broken)
    # A comment of its own: the validation cache holds results by query text.
    query = "# masked-validation-error\n{ workspace { id } }"
    with caplog.at_level(logging.ERROR, logger="keyplane.graphql"):
        [error] = await _errors(ws, query)
    assert error["message"] == "Internal server error"
    assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
    assert detail not in str(error)
    # The server's log has the error's type and stack, not its message (it may quote a value).
    [logged] = [r.getMessage() for r in caplog.records if r.name == "keyplane.graphql"]
    assert "RuntimeError" in logged and "in broken" in logged
    assert detail not in caplog.text


async def test_introspection_can_be_switched_off(
    app: Starlette, settings: Settings, ws: WorkspaceHandle
) -> None:
    closed = create_app(Settings(database_url=settings.database_url, introspection=False))
    transport = httpx.ASGITransport(app=closed, client=("203.0.113.30", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        headers = {"Authorization": f"Bearer {ws.token}"}
        body = (
            await client.post(
                "/graphql", json={"query": "{ __schema { types { name } } }"}, headers=headers
            )
        ).json()
        assert body["errors"] and "introspection" in body["errors"][0]["message"].lower()
        ordinary = (
            await client.post("/graphql", json={"query": "{ workspace { id } }"}, headers=headers)
        ).json()
        assert ordinary["data"]["workspace"]["id"] == ws.id
        anonymous = await client.post(
            "/graphql", json={"query": "{ __schema { queryType { name } } }"}
        )
        assert anonymous.status_code == 401  # without introspection, nothing runs without a bearer


async def test_introspection_without_a_bearer_is_allowed_when_enabled(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/graphql", json={"query": "{ __schema { queryType { name } } }"})
    assert response.status_code == 200
    assert response.json()["data"]["__schema"]["queryType"]["name"] == "Query"
