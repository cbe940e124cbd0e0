"""Two live server processes on one PostgreSQL: a key revoked through one is refused by the
other within 1 s (LISTEN/NOTIFY), without restarting anything."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.live import live_server
from tests.support import WorkspaceHandle


@pytest.mark.postgres_only
@pytest.mark.slow
async def test_revocation_reaches_every_process_within_a_second(
    ws: WorkspaceHandle, database_url: str
) -> None:
    key_id, secret = await ws.create_key()
    with live_server(database_url) as first, live_server(database_url) as second:
        async with httpx.AsyncClient(timeout=5) as http:
            for base in (first, second):  # both processes now hold the key in their cache
                response = await http.get(f"{base}/v1/verify", headers={"X-API-Key": secret})
                assert response.json()["code"] == "VALID"
            revoked = await http.post(
                f"{first}/graphql",
                json={"query": f'mutation {{ revoke(id: "{key_id}") {{ __typename }} }}'},
                headers={"Authorization": f"Bearer {ws.token}"},
            )
            assert revoked.json()["data"]["revoke"]["__typename"] == "RevokeSuccess"
            # The process that ran the mutation refuses at once.
            at_first = await http.get(f"{first}/v1/verify", headers={"X-API-Key": secret})
            assert at_first.json()["code"] == "REVOKED"
            started = time.monotonic()
            while True:
                at_second = await http.get(f"{second}/v1/verify", headers={"X-API-Key": secret})
                if at_second.json()["code"] == "REVOKED":
                    break
                assert time.monotonic() - started < 1.0, "the other process still said VALID"
                time.sleep(0.02)
