"""The key cache's safety net: a periodic bulk re-read of every cached key catches a change
whose notification was lost, without reloading hot keys on the request path."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette

from app import cache as cache_module
from app.cache import KeyCache, moved_keys, probe, record_from_model
from app.settings import Settings
from app.tokens import hash_secret
from models import ApiKey, KeyStatus
from tests.support import WorkspaceHandle


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
    """Chunks of 3 keys per query, listed 2 at a time: every cached key is checked exactly once,
    the changed ones are caught wherever they fall, and the rest are confirmed."""
    monkeypatch.setattr(cache_module, "REFRESH_CHUNK", 3)
    monkeypatch.setattr(cache_module, "REFRESH_SLICE", 2)
    cache: KeyCache = app.state.key_cache
    cache.clear()
    keys = [await ws.create_key() for _ in range(8)]
    for _, secret in keys:
        assert await code(ws, secret) == "VALID"
    entries = {secret: cache.fresh(hash_secret(secret)) for _, secret in keys}
    before = {secret: entry.fresh_until for secret, entry in entries.items() if entry}
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
        assert entry is not None and entry.fresh_until > before[secret]  # and confirmed


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
    source = kept.source
    await ApiKey.filter(public_id=key_id).update(permissions=["b", "a"])
    checked, changed = await cache.refresh()
    assert checked >= 1 and changed == 0
    assert cache.fresh(hash_secret(secret)) is kept
    assert kept.source != source  # the new row's fingerprint
    pk = kept.record.key_pk
    assert kept.probe == probe(kept.record, kept.source) == f"{pk}:{kept.source}"
    assert await moved_keys([kept.probe]) == set()
    # An out-of-date fingerprint, a deleted row: both moved.
    assert await moved_keys([probe(kept.record, source), kept.probe]) == {pk}
    await ApiKey.filter(public_id=key_id).delete()
    assert await moved_keys([kept.probe]) == {pk}


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
