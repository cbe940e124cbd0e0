"""Cross-process notices (LISTEN/NOTIFY): a process acts on the other processes' notices and
skips its own, whose keys its cache dropped before the mutation returned."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from starlette.applications import Starlette

from app.cache import KeyCache
from app.invalidation import CHANNEL, MAX_PAYLOAD, chunks, new_origin
from app.tokens import hash_secret
from tests.support import WorkspaceHandle, verify


async def notify(database_url: str, payload: str) -> None:
    """A notice as another process sends it."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
    finally:
        await conn.close()


async def dropped(cache: KeyCache, secret_hash: str, within: float = 5.0) -> None:
    """Wait until the cache no longer holds this key."""
    deadline = asyncio.get_running_loop().time() + within
    while cache.fresh(secret_hash) is not None:
        assert asyncio.get_running_loop().time() < deadline, "the notice never arrived"
        await asyncio.sleep(0.01)


@pytest.mark.postgres_only
async def test_own_notices_are_skipped_and_other_processes_notices_drop_keys(
    app: Starlette, ws: WorkspaceHandle, database_url: str
) -> None:
    cache: KeyCache = app.state.key_cache
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    _, marked = await ws.create_key()
    _, unmarked = await ws.create_key()
    for token in (secret, marked, unmarked):
        assert await verify(ws.client, token) == "VALID"
    heard: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[-1]))
        await ws.q(
            """mutation($id: ID!) { updateKey(id: $id,
            input: {permissions: ["pdf.read", "pdf.write"]}) { __typename } }""",
            {"id": key_id},
        )
        own = await asyncio.wait_for(heard.get(), 5)
    finally:
        await conn.close()
    assert own.split(",") == [app.state.notice_origin, hash_secret(secret)]
    # Dropped before the mutation returned: the next verify reads the new permissions back.
    assert await verify(ws.client, secret, "pdf.write") == "VALID"
    reread = cache.fresh(hash_secret(secret))
    assert reread is not None
    misses = cache.misses
    # The app's own notice heard late (after the read-back), then another process's notice:
    # PostgreSQL delivers a listener's notices in commit order, so once the second has dropped
    # its key, the first has been handled too.
    await notify(database_url, own)
    await notify(database_url, f"{new_origin()},{hash_secret(marked)}")
    await dropped(cache, hash_secret(marked))
    # The own notice did not drop the entry read back from the committed row.
    assert cache.fresh(hash_secret(secret)) is reread
    assert await verify(ws.client, secret, "pdf.write") == "VALID"
    assert cache.misses == misses
    # A process that does not mark its notices (an older version) is heard as well.
    await notify(database_url, hash_secret(unmarked))
    await dropped(cache, hash_secret(unmarked))
    assert await verify(ws.client, marked) == "VALID"  # read back, still the same answer


def test_every_payload_opens_with_the_origin_and_stays_under_the_limit() -> None:
    origin = new_origin()
    hashes = [f"{n:064x}" for n in range(500)]
    payloads = chunks(hashes, origin)
    assert len(payloads) > 1
    items = [payload.split(",") for payload in payloads]
    assert all(len(payload) <= MAX_PAYLOAD for payload in payloads)
    assert all(part[0] == origin and len(part) > 1 for part in items)
    assert [h for part in items for h in part[1:]] == hashes
    assert chunks([], origin) == []
    assert new_origin() != origin
