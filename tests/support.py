"""Helpers shared by the tests: a movable clock, a GraphQL caller, a verify caller, a key cache
of its own, a fresh workspace, background flushes stopped."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from app.cache import KeyCache
from app.settings import Settings
from tests.pgserver import PostgresServer

_names = itertools.count()


class OffsetClock:
    """Real time plus an offset tests can push forward (no sleeping through grace periods)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)

    def clear_of_the_hour(self, clearance: timedelta) -> None:
        """Usage is counted in hourly buckets: a test that finds one bucket per key (or one
        per day) would find two if the hour turned while it ran. When the next hour is less
        than `clearance` away, move just past it (forward only, as pushing through a grace
        period does)."""
        now = self.now()
        next_hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        if next_hour - now < clearance:
            self.offset += next_hour - now + timedelta(seconds=1)


@asynccontextmanager
async def flushes_stopped(*recorders: Any) -> AsyncIterator[None]:
    """While inside, these recorders' (the app's `usage`, `activity`) background flushes are
    stopped: the test flushes itself, and a background flush would take its counts first. The
    app is the session's, so they start again after."""
    for recorder in recorders:
        await recorder._loop.stop()
    try:
        yield
    finally:
        for recorder in recorders:
            await recorder.start()


@asynccontextmanager
async def refreshes_stopped(app: Starlette) -> AsyncIterator[None]:
    """While inside, the session app's key-cache refresh does not run by itself. A test that
    patches `app.cache`'s queries (`moved_slots`, `load_rows`) for a cache of its own is then
    the only caller: the app's refresh (every 30 s) would otherwise call the patched function
    when it happened to run meanwhile."""
    cache: KeyCache = app.state.key_cache
    await cache.stop()
    try:
        yield
    finally:
        await cache.start()


def cache_of(app: Starlette, **settings: Any) -> KeyCache:
    """A key cache of its own on the app's database (not the one the app serves from), with
    these settings changed (`cache_size=4`, say)."""
    return KeyCache(Settings(database_url=app.state.settings.database_url, **settings))


async def verify(
    client: httpx.AsyncClient, token: str | None, permissions: str | None = None, **kw: Any
) -> str:
    """`GET /v1/verify` with the key in `X-API-Key` (and `X-Required-Permissions` when given);
    returns the answer's code. `kw` goes to the request (extra `headers`, say)."""
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["X-API-Key"] = token
    if permissions is not None:
        headers["X-Required-Permissions"] = permissions
    response = await client.get("/v1/verify", headers=headers, **kw)
    code: str = response.json()["code"]
    return code


async def gql(
    client: httpx.AsyncClient,
    query: str,
    variables: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    expect_status: int = 200,
) -> dict[str, Any]:
    """POST a GraphQL operation; assert the HTTP status and return the JSON body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await client.post(
        "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
    )
    assert response.status_code == expect_status, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class WorkspaceHandle:
    """A freshly bootstrapped workspace and an HTTP client authenticated as its owner."""

    client: httpx.AsyncClient
    id: str
    name: str
    token: str
    environments: dict[str, str] = field(default_factory=dict)  # name -> env ID
    client_side_ids: dict[str, str] = field(default_factory=dict)

    async def q(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run an operation as the owner and return `data`, failing on any top-level error."""
        body = await gql(self.client, query, variables, token=self.token)
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def raw(
        self, query: str, variables: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        return await gql(self.client, query, variables, token=token or self.token)

    async def create_key(self, env: str = "production", **fields: Any) -> tuple[str, str]:
        """Create a key in an environment; returns (key ID, secret)."""
        data = await self.q(
            """mutation($input: CreateKeyInput!) { createKey(input: $input) {
                 __typename ... on CreateKeySuccess { secret key { id } }
                 ... on Error { code message } } }""",
            {"input": {"environmentId": self.environments[env], "name": "key", **fields}},
        )
        result = data["createKey"]
        assert result["__typename"] == "CreateKeySuccess", result
        return result["key"]["id"], result["secret"]


def unique_name(base: str = "ws") -> str:
    return f"{base}-{next(_names)}-{datetime.now(UTC).strftime('%H%M%S%f')}"


def own_database(tmp_path: Path, pg_server: PostgresServer | None, name: str) -> str:
    """A database of the test's own (not the session's): a new PostgreSQL database on the
    session's server, or a SQLite file in the test's temp dir."""
    from tests.conftest import BACKEND

    if BACKEND == "postgres":
        assert pg_server is not None
        pg_server.create_database(name)
        return pg_server.url(name)
    return f"sqlite://{tmp_path / (name + '.db')}"
