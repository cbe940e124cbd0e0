"""Fixtures: a real database (SQLite file or a PostgreSQL server the suite starts), the real
app with its lifespan, and an httpx client over ASGI.

`make test` runs the suite twice: KEYPLANE_TEST_DATABASE=sqlite, then =postgres.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from app.db import migrate
from app.main import create_app
from app.services.workspaces import bootstrap
from app.settings import Settings
from models import Environment, Plan, Workspace
from tests.pgserver import PostgresServer
from tests.support import OffsetClock, WorkspaceHandle, unique_name

BACKEND = os.environ.get("KEYPLANE_TEST_DATABASE", "sqlite")
if BACKEND not in {"sqlite", "postgres"}:
    raise RuntimeError(f"KEYPLANE_TEST_DATABASE={BACKEND!r}: use sqlite or postgres")


def pytest_report_header() -> str:
    return f"keyplane database backend: {BACKEND}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if BACKEND == "postgres":
        return
    skip = pytest.mark.skip(
        reason="PostgreSQL only: runs in the KEYPLANE_TEST_DATABASE=postgres pass"
    )
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | None]:
    if BACKEND != "postgres":
        yield None
        return
    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def database_url(pg_server: PostgresServer | None) -> Iterator[str]:
    if pg_server is not None:
        pg_server.create_database("keyplane")
        yield pg_server.url("keyplane")
        return
    folder = Path(tempfile.mkdtemp(prefix="keyplane-sqlite-"))
    try:
        yield f"sqlite://{folder / 'keyplane.sqlite3'}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture(autouse=True)
def clear_of_the_hour(clock: OffsetClock) -> None:
    """No test starts within two minutes of the next hour in the app's time (usage buckets are
    hourly; see OffsetClock.clear_of_the_hour). Live server processes keep real time; no test
    of theirs counts on one bucket."""
    clock.clear_of_the_hour(timedelta(minutes=2))


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


@pytest.fixture(scope="session")
async def app(settings: Settings, clock: OffsetClock) -> AsyncIterator[Starlette]:
    await migrate(settings.database_url)
    application = create_app(settings, clock=clock)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        yield c


async def make_workspace(
    client: httpx.AsyncClient,
    clock: OffsetClock,
    plan: Plan = Plan.SCALE_ENTERPRISE,
    key_prefix: str = "kp",
) -> WorkspaceHandle:
    result = await bootstrap(unique_name(), plan, key_prefix, clock.now())
    workspace: Workspace = result.workspace
    handle = WorkspaceHandle(
        client=client, id=workspace.public_id, name=workspace.name, token=result.token
    )
    for env in await Environment.filter(workspace_id=workspace.id):
        handle.environments[env.name] = env.public_id
        handle.client_side_ids[env.name] = env.client_side_id
    return handle


@pytest.fixture
async def ws(app: Starlette, client: httpx.AsyncClient, clock: OffsetClock) -> WorkspaceHandle:
    """A fresh workspace on an unlimited plan; tests are isolated by workspace."""
    return await make_workspace(client, clock)


@pytest.fixture
async def other_ws(
    app: Starlette, client: httpx.AsyncClient, clock: OffsetClock
) -> WorkspaceHandle:
    """A second, unrelated workspace, for isolation tests."""
    return await make_workspace(client, clock)
