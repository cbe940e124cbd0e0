"""Schemathesis fuzzes every query and mutation of the live GraphQL schema with an authenticated
token: no 500s and no unmasked errors. Bounded: a few examples per operation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.live import live_server
from tests.support import WorkspaceHandle

EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def fuzz_target(database_url: str) -> Iterator[str]:
    # Fuzzed logins fail often; a generous limit keeps them from locking the fuzzer out.
    with live_server(database_url, {"KEYPLANE_AUTH_FAILURE_LIMIT": "100000"}) as base_url:
        yield base_url


@pytest.fixture
def bearer(ws: WorkspaceHandle) -> dict[str, str]:
    return {"Authorization": f"Bearer {ws.token}"}


def _check(case: Any, bearer: dict[str, str]) -> None:
    response = case.call(headers=bearer, timeout=10)
    assert response.status_code < 500, response.text
    body = response.json()
    for error in body.get("errors") or []:
        message = error.get("message", "")
        assert "Traceback" not in message and "SELECT " not in message, message
        code = error.get("extensions", {}).get("code")
        assert code != "INTERNAL_SERVER_ERROR", f"server error for {case.body!r}"


@pytest.mark.slow
def test_no_operation_breaks_the_server(fuzz_target: str, bearer: dict[str, str]) -> None:
    schema = schemathesis.graphql.from_url(f"{fuzz_target}/graphql", headers=bearer)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 27  # every query and mutation is fuzzed
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def fuzz(case: Any) -> None:
            _check(case, bearer)

        fuzz()
