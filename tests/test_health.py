"""`GET /governance/health` on either database (the 503 cases, which stop PostgreSQL, are in
tests/test_faults.py)."""

from __future__ import annotations

import httpx


async def test_health_is_ok_when_the_database_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/governance/health")  # no credentials: health needs none
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}  # CONTRACT §5, exactly
    assert response.headers["content-type"].startswith("application/json")
