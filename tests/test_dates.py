"""DateTime arguments at the edges of what a datetime holds: year 1 or 9999 with an offset used
to overflow on the way to UTC (or a bucket added to the end of a range), an internal error.
Every DateTime argument now lies from 1970-01-01 to before 9999-01-01, UTC, or is a typed
error that names it."""

from __future__ import annotations

import pytest

from tests.support import WorkspaceHandle

OUT_OF_RANGE = [
    "0001-01-01T00:00:00+05:00",  # before year 1 in UTC
    "0001-01-01T00:00:00+00:00",
    "1969-12-31T23:59:59+00:00",
    "9999-12-31T23:59:59-05:00",  # past year 9999 in UTC
    "9999-12-31T23:59:59+00:00",
    "9999-01-01T00:00:00+00:00",
]

QUERIES = {
    "usage.from": "query($d: DateTime) { usage(from: $d) { totals { totalRequests } } }",
    "usage.to": "query($d: DateTime) { usage(to: $d, granularity: DAY) { series { start } } }",
    "denials.since": "query($d: DateTime) { denials(since: $d) { edges { cursor } } }",
    "denialsByIp.since": "query($d: DateTime) { denialsByIp(since: $d) { ip } }",
    "anomalies.since": "query($d: DateTime) { anomalies(since: $d) { kind } }",
}


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
@pytest.mark.parametrize("query", sorted(QUERIES))
async def test_queries_refuse_moments_out_of_range_naming_them(
    ws: WorkspaceHandle, query: str, moment: str
) -> None:
    response = await ws.client.post(
        "/graphql",
        json={"query": QUERIES[query], "variables": {"d": moment}},
        headers={"Authorization": f"Bearer {ws.token}"},
    )
    [error] = response.json()["errors"]
    assert error["extensions"]["code"] == "VALIDATION_FAILED", error
    assert moment in error["message"] and "out of range" in error["message"]


@pytest.mark.parametrize("moment", OUT_OF_RANGE)
async def test_expiry_out_of_range_is_a_validation_error(ws: WorkspaceHandle, moment: str) -> None:
    key_id, _ = await ws.create_key()
    create = await ws.q(
        """mutation($input: CreateKeyInput!) { createKey(input: $input) {
             __typename ... on Error { code message } } }""",
        {
            "input": {
                "environmentId": ws.environments["production"],
                "name": "k",
                "expiresAt": moment,
            }
        },
    )
    update = await ws.q(
        """mutation($id: ID!, $input: UpdateKeyInput!) { updateKey(id: $id, input: $input) {
             __typename ... on Error { code message } } }""",
        {"id": key_id, "input": {"expiresAt": moment}},
    )
    for result in (create["createKey"], update["updateKey"]):
        assert result["__typename"] == "ValidationFailedError", result
        assert moment in result["message"]


async def test_the_edges_of_the_range_are_accepted(ws: WorkspaceHandle) -> None:
    data = await ws.q(
        """query { usage(from: "1970-01-01T00:00:00+00:00", to: "1970-03-01T00:00:00+00:00",
                         granularity: DAY) { series { start } }
                   denials(since: "1970-01-01T00:00:00+00:00") { edges { cursor } } }"""
    )
    assert len(data["usage"]["series"]) == 59 and data["denials"]["edges"] == []
    # The latest expiry there is, given with an offset: stored and answered as UTC.
    _, secret = await ws.create_key(expiresAt="9998-12-31T18:59:59-05:00")
    response = await ws.client.get("/v1/verify", headers={"X-API-Key": secret})
    assert response.json()["code"] == "VALID"
    assert response.json()["expiresAt"].startswith("9998-12-31T23:59:59")
