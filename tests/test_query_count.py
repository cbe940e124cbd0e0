"""No N+1: a page of keys with environment, role and usage costs the same number of SQL
statements for 5 keys as for 50."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette

from tests.support import WorkspaceHandle, flushes_stopped, refreshes_stopped

PAGE = """query($n: Int!) { keys(first: $n, type: SERVER) { totalCount edges { node {
  id name environment { name } role { name } usage { totalRequests } rotationDue } } } }"""


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@pytest.fixture
async def sql_counter(app: Starlette) -> AsyncIterator[_Counter]:
    # Tortoise logs each statement on this logger at DEBUG; the log policy's filter drops the
    # record before handlers, so count at the filter stage instead. The app's own background
    # statements (the refresh; the roll-up and prune in the usage loop) are kept out.
    logger = logging.getLogger("tortoise.db_client")
    counter = _Counter()

    class _Count(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            counter.count += 1
            return True

    probe = _Count()
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.filters.insert(0, probe)
    try:
        async with (
            refreshes_stopped(app),
            flushes_stopped(app.state.usage, app.state.activity),
        ):
            yield counter
    finally:
        logger.removeFilter(probe)
        logger.setLevel(previous)


async def test_listing_keys_costs_a_constant_number_of_queries(
    ws: WorkspaceHandle, sql_counter: _Counter
) -> None:
    role = await ws.q(
        'mutation { createRole(name: "r", permissions: ["a.b"]) {'
        " ... on CreateRoleSuccess { role { id } } } }"
    )
    role_id = role["createRole"]["role"]["id"]
    for i in range(50):
        env = ("production", "staging", "development")[i % 3]
        await ws.create_key(env, roleId=role_id if i % 2 else None)
    counts = {}
    for size in (5, 50):
        sql_counter.count = 0
        data = await ws.q(PAGE, {"n": size})
        assert len(data["keys"]["edges"]) == size
        counts[size] = sql_counter.count
    assert counts[5] == counts[50], counts
    assert 0 < counts[50] <= 8, counts
