"""The key cache's safety net: a periodic bulk re-read of every cached key catches a change
whose notification was lost, without reloading hot keys on the request path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from starlette.applications import Starlette

from app import cache as cache_module
from app.cache import CacheEntry, KeyCache, Unavailable, moved_slots, record_from_model
from app.settings import Settings
from app.tokens import hash_secret
from models import ApiKey, KeyStatus
from tests.support import WorkspaceHandle, cache_of, refreshes_stopped


@pytest.fixture(autouse=True)
async def alone(app: Starlette) -> AsyncIterator[None]:
    """These tests patch the cache module's queries: the app's own refresh stays out of it."""
    async with refreshes_stopped(app):
        yield


async def code(ws: WorkspaceHandle, secret: str) -> str:
    response = await ws.client.get("/v1/verify", headers={"X-API-Key": secret})
    result: str = response.json()["code"]
    return result


async def test_refresh_catches_changes_that_bypassed_the_change_feed(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    cache: KeyCache = app.state.key_cache
    disabled_id, disabled = await ws.create_key()
    gone_id, gone = await ws.create_key()
    _, same = await ws.create_key(permissions=["a"])
    for secret in (disabled, gone, same):
        assert await code(ws, secret) == "VALID"
    kept = cache.fresh(hash_secret(same))
    assert kept is not None
    # Written behind the service layer's back: no notification reaches the cache.
    await ApiKey.filter(public_id=disabled_id).update(status=KeyStatus.DISABLED)
    await ApiKey.filter(public_id=gone_id).delete()
    assert await code(ws, disabled) == "VALID"  # still the cached answer
    assert await code(ws, gone) == "VALID"

    misses = cache.misses
    checked, changed = await cache.refresh()
    assert checked >= 3 and changed >= 2
    assert await code(ws, disabled) == "DISABLED"
    assert await code(ws, gone) == "INVALID_KEY"
    # The unchanged key kept its entry (and its rendered answer): confirmed, not reloaded.
    assert cache.fresh(hash_secret(same)) is kept
    assert await code(ws, same) == "VALID"
    assert cache.misses == misses + 1  # only the deleted key was looked up again


async def test_refresh_in_many_chunks_and_slices_checks_every_key_once(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 3 keys per query: every cached key is checked exactly once, the changed ones
    are caught wherever they fall, and the rest are confirmed without their entries being
    written."""
    monkeypatch.setattr(cache_module, "REFRESH_CHUNK", 3)
    cache: KeyCache = app.state.key_cache
    cache.clear()
    keys = [await ws.create_key() for _ in range(8)]
    for _, secret in keys:
        assert await code(ws, secret) == "VALID"
    entries = {secret: cache.fresh(hash_secret(secret)) for _, secret in keys}
    before = {secret: cache.last_confirmed(entry) for secret, entry in entries.items() if entry}
    own = {secret: entry.fresh_until for secret, entry in entries.items() if entry}
    assert len(before) == 8
    await ApiKey.filter(public_id=keys[4][0]).update(status=KeyStatus.DISABLED)
    await ApiKey.filter(public_id=keys[7][0]).delete()

    cached = sum(1 for entry in dict.values(cache._entries) if entry.record is not None)
    checked, changed = await cache.refresh()
    assert (checked, changed) == (cached, 2)  # each cached key once (the 8, and any others)
    assert await code(ws, keys[4][1]) == "DISABLED"
    assert await code(ws, keys[7][1]) == "INVALID_KEY"
    for index in (0, 1, 2, 3, 5, 6):
        secret = keys[index][1]
        entry = cache.fresh(hash_secret(secret))
        assert entry is entries[secret]  # kept, not reloaded
        assert entry is not None and cache.last_confirmed(entry) > before[secret]  # confirmed
        assert entry.fresh_until == own[secret]  # by its chunk: the entry was not written
    cache.clear()  # the app is the session's: no slots numbered in chunks of 3 are left behind


async def test_refresh_drops_a_key_whose_row_no_longer_carries_its_secret(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """The refresh finds rows by row ID (PostgreSQL); the fingerprint covers the secret hash, so
    a row that now carries another hash (written behind the service's back) no longer answers
    for the old secret."""
    cache: KeyCache = app.state.key_cache
    key_id, secret = await ws.create_key()
    _, other = await ws.create_key()
    for token in (secret, other):
        assert await code(ws, token) == "VALID"
    await ApiKey.filter(public_id=key_id).update(secret_hash="0" * 64)
    assert await code(ws, secret) == "VALID"  # the cached answer, until the refresh
    checked, changed = await cache.refresh()
    assert checked >= 2 and changed == 1
    assert cache.fresh(hash_secret(secret)) is None
    assert cache.fresh(hash_secret(other)) is not None
    assert await code(ws, secret) == "INVALID_KEY"
    assert await code(ws, other) == "VALID"


async def test_a_row_that_moved_without_changing_the_record_keeps_its_entry(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """A row whose stored text changed but whose record reads the same (permissions reordered)
    has moved: it is read again, found equal, and its entry (and rendered answer) kept under the
    new fingerprint, so the next refresh finds nothing moved."""
    cache: KeyCache = app.state.key_cache
    key_id, secret = await ws.create_key(permissions=["a", "b"])
    assert await code(ws, secret) == "VALID"
    kept = cache.fresh(hash_secret(secret))
    assert kept is not None and kept.record is not None
    slots = cache._slots
    source = slots.fps[kept.slot]
    await ApiKey.filter(public_id=key_id).update(permissions=["b", "a"])
    checked, changed = await cache.refresh()
    assert checked >= 1 and changed == 0
    assert cache.fresh(hash_secret(secret)) is kept
    current = slots.fps[kept.slot]
    assert current != source  # the new row's fingerprint
    pk = kept.record.key_pk
    assert slots.ids[kept.slot] == pk and slots.hashes[kept.slot] == hash_secret(secret)
    assert await moved_slots([pk], [current]) == []
    # An out-of-date fingerprint, a deleted row: both moved; a free slot (row ID 0) never.
    assert await moved_slots([0, pk, pk], [0, source, current]) == [1]
    await ApiKey.filter(public_id=key_id).delete()
    assert await moved_slots([pk, 0], [current, 0]) == [0]


def check_slots(cache: KeyCache) -> None:
    """Every cached key holds its own slot, naming its hash and row; every other slot is free."""
    slots = cache._slots
    held: dict[int, CacheEntry] = {}
    for secret_hash, entry in dict.items(cache._entries):
        if entry.record is None:
            assert entry.slot == -1
            continue
        assert slots.hashes[entry.slot] == secret_hash
        assert slots.ids[entry.slot] == entry.record.key_pk
        held[entry.slot] = entry
    for slot in range(len(slots)):
        if slot not in held:
            assert (slots.hashes[slot], slots.ids[slot]) == (None, 0)
            assert slot in slots.free or slot in slots.held


async def test_slots_follow_fills_evictions_and_invalidations(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """A bounded cache reuses the slots of evicted and invalidated keys, so the refresh's arrays
    stay as long as the cache is large, and the refresh of a churned cache checks exactly the
    keys it holds."""
    cache = cache_of(app, cache_size=4)
    keys = [await ws.create_key() for _ in range(7)]
    for _, secret in keys:
        assert await cache.get(hash_secret(secret)) is not None
        check_slots(cache)
    assert await cache.get(hash_secret("kp_unknown")) is None  # a negative holds no slot
    check_slots(cache)
    assert len(cache._slots) == 5  # 4 held and one slot between a fill and its eviction
    await cache.keys_changed([hash_secret(keys[6][1])])
    check_slots(cache)
    assert await cache.get(hash_secret(keys[0][1])) is not None
    check_slots(cache)
    assert len(cache._slots) == 5
    checked, changed = await cache.refresh()
    assert (checked, changed) == (3, 0)  # the three keys among the 4 entries (one negative)


async def test_a_refresh_confirms_only_what_it_checked(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a refresh no slot is reused (one freed before it, one freed meanwhile), and a key
    filled meanwhile is not confirmed by it (its chunk's confirmation ends at the slots the chunk
    had when it was checked); an entry past its own fresh_until is served while its chunk's
    confirmation lasts."""
    cache = cache_of(app)
    keys = [await ws.create_key() for _ in range(4)]
    for _, secret in (*keys[:2], keys[3]):
        assert await cache.get(hash_secret(secret)) is not None
    await cache.keys_changed([hash_secret(keys[3][1])])  # slot 2 is free before the refresh
    first = cache.fresh(hash_secret(keys[0][1]))
    assert first is not None
    first.fresh_until = 0.0  # as if its two refresh periods were over
    assert cache.fresh(hash_secret(keys[0][1])) is None
    real = cache_module.moved_slots
    during: list[int] = []

    async def meanwhile(ids: Sequence[int], sources: Sequence[int]) -> list[int]:
        moved = await real(ids, sources)
        await cache.keys_changed([hash_secret(keys[1][1])])  # frees slot 1 ...
        assert await cache.get(hash_secret(keys[2][1])) is not None  # ... neither reused: slot 3
        during.append(len(cache._slots))
        return moved

    monkeypatch.setattr(cache_module, "moved_slots", meanwhile)
    assert await cache.refresh() == (2, 0)
    assert during == [4]
    check_slots(cache)
    late = cache.fresh(hash_secret(keys[2][1]))
    assert late is not None and late.slot == 3
    assert cache._slots.confirmed_until(late.slot) == 0.0  # filled after its chunk was checked
    assert cache._slots.free == [2, 1]  # slot 1 released once the refresh was over
    renewed = cache.fresh(hash_secret(keys[0][1]))
    assert renewed is first and first.fresh_until > 0.0  # confirmed by its chunk


async def test_entries_share_their_fresh_until_floats(app: Starlette, ws: WorkspaceHandle) -> None:
    """Keys filled within FILL_UNTIL_SHARED of one another hold one float for the end of their
    freshness, the first fill's (so an entry is fresh a little less long, never longer), and
    keys that a refresh confirms in one chunk hold that chunk's float: a verification then reads
    no float of its entry's own."""
    cache = cache_of(app)
    keys = [await ws.create_key() for _ in range(3)]
    started = time.monotonic()
    for _, secret in keys:
        assert await cache.get(hash_secret(secret)) is not None
    entries = [cache.fresh(hash_secret(secret)) for _, secret in keys]
    assert all(entry is not None for entry in entries)
    ends = [entry.fresh_until for entry in entries if entry is not None]
    if time.monotonic() - started < cache_module.FILL_UNTIL_SHARED:  # not on a stalled machine
        assert ends[0] is ends[1] is ends[2]
    assert started + cache._ttl <= min(ends) and max(ends) <= time.monotonic() + cache._ttl
    for entry in entries:
        assert entry is not None
        entry.fresh_until = 0.0  # as if its two refresh periods were over
    assert await cache.refresh() == (3, 0)
    renewed = [cache.fresh(hash_secret(secret)) for _, secret in keys]
    assert renewed == entries
    chunk = cache._slots.until[0]
    assert chunk > time.monotonic()
    assert all(entry is not None and entry.fresh_until is chunk for entry in entries)


async def test_a_clear_stops_a_refresh(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache emptied during a refresh (the listener reconnected): the refresh stops, and
    confirms and applies nothing to the new, empty cache."""
    cache = cache_of(app)
    key_id, secret = await ws.create_key()
    assert await cache.get(hash_secret(secret)) is not None
    await ApiKey.filter(public_id=key_id).update(status=KeyStatus.DISABLED)
    real = cache_module.moved_slots

    async def cleared(ids: Sequence[int], sources: Sequence[int]) -> list[int]:
        moved = await real(ids, sources)
        assert moved == [0]
        cache.clear()
        return moved

    monkeypatch.setattr(cache_module, "moved_slots", cleared)
    assert await cache.refresh() == (0, 0)
    assert len(cache) == 0 and len(cache._slots) == 0 and len(cache._slots.until) == 0
    record = await cache.get(hash_secret(secret))
    assert record is not None and record.status == "DISABLED"


async def test_an_entry_invalidated_during_a_failed_lookup_is_not_served_stale(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the database fails a lookup, a recently confirmed entry may be served stale, but not
    one that was invalidated while the lookup ran (the key was changed: revoked, say)."""
    cache = cache_of(app, max_staleness_seconds=300)
    _, secret = await ws.create_key()
    secret_hash = hash_secret(secret)
    record = await cache.get(secret_hash)
    assert record is not None
    real = cache_module.load_rows
    invalidate = False

    async def failing(secret_hashes: Sequence[str]) -> dict[str, dict[str, object]]:
        if invalidate:
            await cache.keys_changed([secret_hash])
        raise ConnectionRefusedError("database down")

    monkeypatch.setattr(cache_module, "load_rows", failing)
    for invalidate in (False, True):
        entry = cache._entries[secret_hash]
        entry.fresh_until = time.monotonic() - 1  # due for a lookup; confirmed 61 s ago
        if not invalidate:
            assert await cache.get(secret_hash) is record  # served stale: the database is down
        else:
            with pytest.raises(Unavailable):
                await cache.get(secret_hash)
    assert cache.fresh(secret_hash) is None
    monkeypatch.setattr(cache_module, "load_rows", real)
    assert await cache.get(secret_hash) == record


async def test_the_refresh_runs_by_itself(app: Starlette, ws: WorkspaceHandle) -> None:
    key_id, secret = await ws.create_key()
    cache = KeyCache(
        Settings(database_url=app.state.settings.database_url, cache_refresh_seconds=0.1)
    )
    record = await cache.get(hash_secret(secret))
    assert record is not None and record.status == "ENABLED"
    key = await ApiKey.get(public_id=key_id).select_related("environment", "workspace", "role")
    assert record == record_from_model(key)  # both ways of reading a key agree
    await ApiKey.filter(public_id=key_id).update(status=KeyStatus.DISABLED)
    await cache.start()
    try:
        for _ in range(50):
            entry = cache.fresh(hash_secret(secret))
            if entry is not None and entry.record is not None and entry.record.status == "DISABLED":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the background refresh did not pick up the change")
    finally:
        await cache.stop()


def test_gc_policy_freezes_survivors_and_collects_all_hourly() -> None:
    import gc

    from app import gcpolicy

    policy = gcpolicy.GcPolicy(10.0)
    try:
        survivor = [object() for _ in range(1000)]
        policy.tick()
        frozen = gc.get_freeze_count()
        assert frozen >= 1000  # the survivors left the generations a full collection walks
        # An hour later: everything is unfrozen and collected, then frozen again.
        policy.last_full -= gcpolicy.FULL_COLLECTION_SECONDS
        before = policy.last_full
        policy.tick()
        assert policy.last_full > before
        assert gc.get_freeze_count() >= 1000
        assert survivor
    finally:
        gc.unfreeze()


async def test_records_share_what_many_keys_repeat(
    app: Starlette, ws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys with the same permissions hold one set and one sorted tuple, and every record of a
    workspace holds the same status, type and ID strings; the shared sets are bounded, and a
    record built after they start over is still exactly right."""
    cache: KeyCache = app.state.key_cache
    secrets = {}
    for name, permissions in (
        ("a", ["pdf.read", "pdf.generate"]),
        ("b", ["pdf.generate", "pdf.read"]),
        ("c", ["x.y"]),
    ):
        _, secrets[name] = await ws.create_key(permissions=permissions)
        assert await code(ws, secrets[name]) == "VALID"
    records = {}
    for name, secret in secrets.items():
        entry = cache.fresh(hash_secret(secret))
        assert entry is not None and entry.record is not None
        records[name] = entry.record
    a, b, c = records["a"], records["b"], records["c"]
    assert a.permissions is b.permissions and a.permission_list is b.permission_list
    assert a.permission_list == ("pdf.generate", "pdf.read")
    assert c.permissions == frozenset({"x.y"}) and c.permissions is not a.permissions
    for field_name in (
        "status",
        "key_type",
        "workspace_id",
        "environment_id",
        "authorized_origins",
    ):
        assert getattr(a, field_name) is getattr(c, field_name), field_name
    # Bounded: with room for one set, each new set starts the table over.
    monkeypatch.setattr(cache_module, "SHARED_SETS_MAX", 1)
    _, other = await ws.create_key(permissions=["z.1"])
    _, another = await ws.create_key(permissions=["z.2"])
    for secret, expected in ((other, frozenset({"z.1"})), (another, frozenset({"z.2"}))):
        assert await code(ws, secret) == "VALID"
        entry = cache.fresh(hash_secret(secret))
        assert entry is not None and entry.record is not None
        assert entry.record.permissions == expected
    assert len(cache_module._shared_permissions) == 1
    response = await ws.client.get(
        "/v1/verify", headers={"X-API-Key": another, "X-Required-Permissions": "z.1"}
    )
    assert response.json()["code"] == "INSUFFICIENT_PERMISSIONS"
