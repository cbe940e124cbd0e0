"""Cache fills: the misses of one event-loop turn share one query (app.cache.MAX_BATCH at most),
each waiter gets its own answer, and a row that cannot be read fails its own lookup only."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from starlette.applications import Starlette
from tortoise import connections

from app import cache as cache_module
from app.tokens import hash_secret
from tests.support import WorkspaceHandle, cache_of, refreshes_stopped


@pytest.fixture(autouse=True)
async def alone(app: Starlette) -> AsyncIterator[None]:
    """These tests patch the cache module's queries: the app's own refresh stays out of it."""
    async with refreshes_stopped(app):
        yield


@pytest.fixture
def queries(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The hashes of each fill query, in order (the real query still runs)."""
    seen: list[list[str]] = []
    real = cache_module.load_rows

    async def counted(secret_hashes: Sequence[str]) -> dict[str, dict[str, Any]]:
        seen.append(list(secret_hashes))
        return await real(secret_hashes)

    monkeypatch.setattr(cache_module, "load_rows", counted)
    return seen


async def test_misses_of_one_turn_share_one_query_and_each_gets_its_own_record(
    app: Starlette, ws: WorkspaceHandle, queries: list[list[str]]
) -> None:
    keys = [await ws.create_key() for _ in range(5)]
    unknown = [secrets.token_hex(32) for _ in range(3)]
    hashes = [hash_secret(secret) for _, secret in keys] + unknown
    cache = cache_of(app)
    # The first key twice: one lookup for it, both callers answered.
    records = await asyncio.gather(*(cache.get(h) for h in [*hashes, hashes[0]]))
    assert [r.key_id if r else None for r in records] == [
        *(key_id for key_id, _ in keys),
        None,
        None,
        None,
        keys[0][0],
    ]
    assert queries == [hashes]  # one query, each hash once
    assert cache.misses == len(hashes) + 1
    # Filled, the unknown ones as negatives: no further query.
    again = await asyncio.gather(*(cache.get(h) for h in hashes))
    assert [r.key_id if r else None for r in again] == [
        r.key_id if r else None for r in records[:-1]
    ]
    assert len(queries) == 1


async def test_a_batch_holds_at_most_max_batch_hashes(
    app: Starlette, ws: WorkspaceHandle, queries: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "MAX_BATCH", 3)
    keys = [await ws.create_key() for _ in range(8)]
    hashes = [hash_secret(secret) for _, secret in keys]
    cache = cache_of(app)
    records = await asyncio.gather(*(cache.get(h) for h in hashes))
    assert [r.key_id if r else None for r in records] == [key_id for key_id, _ in keys]
    assert [len(q) for q in queries] == [3, 3, 2]
    assert sorted(h for q in queries for h in q) == sorted(hashes)


async def test_a_row_that_cannot_be_read_fails_only_its_own_lookup(
    app: Starlette, ws: WorkspaceHandle, queries: list[list[str]]
) -> None:
    (good_id, good), (bad_id, bad), (other_id, other) = [await ws.create_key() for _ in range(3)]
    # Written behind the service's back: no valid network (the API would refuse it).
    await connections.get("default").execute_query(
        f"UPDATE api_keys SET allowed_ips = '[\"not-an-ip\"]' WHERE public_id = '{bad_id}'"
    )
    cache = cache_of(app)
    results = await asyncio.gather(
        *(cache.get(hash_secret(s)) for s in (good, bad, other)), return_exceptions=True
    )
    assert len(queries) == 1 and len(queries[0]) == 3
    first, failed, last = results
    assert not isinstance(first, BaseException) and first is not None
    assert first.key_id == good_id
    assert not isinstance(last, BaseException) and last is not None
    assert last.key_id == other_id
    assert isinstance(failed, ValueError)
    assert "not-an-ip" in str(failed)
    assert cache.fresh(hash_secret(bad)) is None  # nothing cached for it


async def test_an_invalidation_holds_back_only_the_fills_of_the_keys_it_names(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """A fill in flight when its own key is invalidated is not stored (it may have read the row
    before the change); another key's invalidation leaves it alone. On PostgreSQL other
    processes' NOTIFYs arrive at any moment, so holding back every fill would make misses of
    unrelated keys depend on that timing."""
    (_, changed), (_, other) = [await ws.create_key() for _ in range(2)]
    unknown = hash_secret(secrets.token_hex(32))
    cache = cache_of(app)
    fills = [asyncio.create_task(cache.get(h)) for h in (hash_secret(changed), hash_secret(other))]
    fills.append(asyncio.create_task(cache.get(unknown)))
    await asyncio.sleep(0)  # all three are in flight, waiting for their shared query
    assert cache.misses == 3 and not any(fill.done() for fill in fills)
    await cache.keys_changed([hash_secret(changed)])
    cache.drop(hash_secret(secrets.token_hex(32)))  # a key nobody is filling
    records = await asyncio.gather(*fills)
    assert records[0] is not None and records[1] is not None and records[2] is None
    assert cache.fresh(hash_secret(changed)) is None  # held back
    kept = cache.fresh(hash_secret(other))
    assert kept is not None and kept.record is records[1]
    negative = cache.fresh(unknown)
    assert negative is not None and negative.record is None
    # A clear holds back every fill in flight.
    again = asyncio.create_task(cache.get(hash_secret(changed)))
    await asyncio.sleep(0)
    cache.clear()
    assert await again is not None
    assert cache.fresh(hash_secret(changed)) is None


@pytest.mark.parametrize("change", ["setStatus", "clear"])
async def test_a_request_after_a_change_never_joins_a_lookup_that_read_before_it(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A lookup that read the key before a disable returned may answer its own callers (they
    raced the change), but a request that starts after the mutation returned must not join
    it: the contract refuses from the moment the mutation returns. It used to join, and got
    VALID from the read of before."""
    key_id, secret = await ws.create_key()
    read, release = asyncio.Event(), asyncio.Event()
    real = cache_module.load_rows

    async def slow_answer(secret_hashes: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = await real(secret_hashes)  # the real read, then a slow reply
        read.set()
        await release.wait()
        return rows

    monkeypatch.setattr(cache_module, "load_rows", slow_answer)
    before = asyncio.create_task(ws.client.get("/v1/verify", headers={"X-API-Key": secret}))
    await asyncio.wait_for(read.wait(), 5)
    data = await ws.q(
        "mutation($id: ID!) { setStatus(id: $id, status: DISABLED) { __typename } }",
        {"id": key_id},
    )
    assert data["setStatus"]["__typename"] == "SetStatusSuccess"
    if change == "clear":  # as when the PostgreSQL listener reconnects: every entry dropped
        cache_of(app).clear()
    monkeypatch.setattr(cache_module, "load_rows", real)
    after = await asyncio.wait_for(ws.client.get("/v1/verify", headers={"X-API-Key": secret}), 5)
    assert (after.status_code, after.json()["code"]) == (401, "DISABLED")
    release.set()
    assert (await before).json()["code"] == "VALID"  # it raced the change: either answer
    # And what it read is not stored: the next request is refused too.
    again = await ws.client.get("/v1/verify", headers={"X-API-Key": secret})
    assert again.json()["code"] == "DISABLED"
