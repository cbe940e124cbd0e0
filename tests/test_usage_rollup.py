"""The hourly roll-up of usage buckets into the keys' lifetime counters (app.usage).

A flush writes one pending bucket per key and hour; the roll-up adds closed hours to the keys'
counters (`api_keys`) and marks them rolled; GraphQL shows counters plus pending buckets. These
tests check, on both backends, that the figures are exact before, during and after a roll-up,
that a late write into a rolled-up hour is counted once, and that flushes racing roll-ups lose
and double nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from starlette.applications import Starlette

from app import usage as usage_module
from app.cache import record_from_model
from app.services import monitoring as monitoring_module
from app.settings import Settings
from app.tokens import hash_secret
from app.usage import MERGED_WRITER, UsageRecorder, hour_of
from app.verifier import UsageTally
from models import ApiKey, UsageBucket
from resolvers import context as context_module
from tests.conftest import BACKEND
from tests.support import OffsetClock, WorkspaceHandle, verify

KEY_USAGE = """query($id: ID!) { key(id: $id) { lastUsedAt usage {
    totalRequests successfulRequests failedRequests lastUsedAt } } }"""
KEY_REPORT = """query($id: ID) { usage(keyId: $id) { totals { totalRequests lastUsedAt } } }"""
ENV_USAGE = """query($env: ID) { usage(environmentId: $env) {
    totals { totalRequests lastUsedAt } } }"""


@pytest.fixture
async def rws(app: Starlette, ws: WorkspaceHandle) -> AsyncIterator[WorkspaceHandle]:
    """The test workspace verifying from an address of its own (no shared denial budget)."""
    transport = httpx.ASGITransport(app=app, client=("198.19.7.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        yield dataclasses.replace(ws, client=c)


def recorder(app: Starlette) -> UsageRecorder:
    usage: UsageRecorder = app.state.usage
    return usage


def tally(app: Starlette, secret: str) -> UsageTally:
    """The usage tally on the cached record of this key."""
    entry = app.state.key_cache.fresh(hash_secret(secret))
    assert entry is not None and entry.record is not None
    found: UsageTally = entry.record.tally
    return found


async def shown(ws: WorkspaceHandle, key_id: str) -> tuple[int, int, int]:
    key = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]
    usage = key["usage"]
    assert key["lastUsedAt"] == usage["lastUsedAt"]
    return (
        int(usage["totalRequests"]),
        int(usage["successfulRequests"]),
        int(usage["failedRequests"]),
    )


async def stored(key_id: str) -> tuple[int, int, int]:
    key = await ApiKey.get(public_id=key_id)
    return key.total_requests, key.successful_requests, key.failed_requests


async def test_rollup_moves_closed_hours_into_the_key_counters_exactly_once(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    codes = [await verify(ws.client, secret) for _ in range(5)]
    codes += [await verify(ws.client, secret, "admin.all") for _ in range(2)]
    assert codes == ["VALID"] * 5 + ["INSUFFICIENT_PERMISSIONS"] * 2
    hour = hour_of(clock.now())
    assert await usage.flush()
    assert await shown(ws, key_id) == (7, 5, 2)
    [bucket] = await UsageBucket.filter(key_id=key_id)
    last_used = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]["lastUsedAt"]
    assert last_used is not None

    # The hour closes: the roll-up moves the bucket into the key's counters (on PostgreSQL it
    # merges the hour's rows, one per writing process, into one rolled row).
    assert await usage.rollup(now=hour + timedelta(hours=1, minutes=1)) >= 1
    [bucket] = await UsageBucket.filter(key_id=key_id)
    assert bucket.rolled and bucket.total_requests == 7
    assert bucket.bucket_start == hour
    assert await stored(key_id) == (7, 5, 2)
    assert (await ApiKey.get(public_id=key_id)).last_used_at is not None
    assert await shown(ws, key_id) == (7, 5, 2)  # not counted twice
    assert (await ws.q(KEY_USAGE, {"id": key_id}))["key"]["lastUsedAt"] == last_used

    # A late write into the rolled-up hour (a batch kept through an outage) is counted once:
    # shown at once, in the key's counters after the next roll-up at the latest.
    assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
    assert await usage.flush()
    assert await shown(ws, key_id) == (10, 8, 2)
    await usage.rollup(now=hour + timedelta(hours=2))
    assert await shown(ws, key_id) == (10, 8, 2)
    assert await stored(key_id) == (10, 8, 2)
    assert not await UsageBucket.filter(key_id=key_id, rolled=False).exists()
    rows = await UsageBucket.filter(key_id=key_id)
    assert sum(b.total_requests for b in rows) == 10
    if BACKEND == "postgres":  # one merged row per hour, whichever process wrote it
        assert {b.writer for b in rows} == {MERGED_WRITER}
        assert len(rows) == len({b.bucket_start for b in rows})


async def test_environment_usage_shows_the_latest_use_before_and_after_rollup(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    env = (await ws.q("query($id: ID!) { key(id: $id) { environment { id } } }", {"id": key_id}))[
        "key"
    ]["environment"]["id"]
    assert await verify(ws.client, secret) == "VALID"
    assert await usage.flush()
    before = (await ws.q(ENV_USAGE, {"env": env}))["usage"]["totals"]
    key_last = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]["lastUsedAt"]
    assert before["lastUsedAt"] is not None and before["lastUsedAt"] >= key_last
    await usage.rollup(now=hour_of(clock.now()) + timedelta(hours=1))
    after = (await ws.q(ENV_USAGE, {"env": env}))["usage"]["totals"]
    assert after == before


async def test_a_rollup_committed_between_a_keys_row_and_its_usage_is_shown_once(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roll-up moves a closed hour from a key's pending buckets into its counters. A read
    that took the counters before that commit and the pending buckets after it saw the hour in
    neither (the key's row is read with the page, its usage later): both are read in one
    statement, whenever the roll-up lands."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    assert [await verify(ws.client, secret) for _ in range(4)] == ["VALID"] * 4
    assert await usage.flush()
    before = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]
    report_before = (await ws.q(KEY_REPORT, {"id": key_id}))["usage"]["totals"]
    assert int(before["usage"]["totalRequests"]) == int(report_before["totalRequests"]) == 4
    assert before["lastUsedAt"] is not None and report_before["lastUsedAt"] is not None

    rolled: list[int] = []

    def rolling_up_first(module: object) -> None:
        read = module.key_totals  # type: ignore[attr-defined]

        async def key_totals(key_ids: list[str]) -> dict[str, usage_module.KeyTotals]:
            # Every hour so far closes just after the key's row was read.
            rolled.append(await usage.rollup(now=hour_of(clock.now()) + timedelta(hours=2)))
            found: dict[str, usage_module.KeyTotals] = await read(key_ids)
            return found

        monkeypatch.setattr(module, "key_totals", key_totals)

    rolling_up_first(context_module)
    rolling_up_first(monitoring_module)
    after = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]
    report_after = (await ws.q(KEY_REPORT, {"id": key_id}))["usage"]["totals"]
    assert rolled[0] >= 1, "the roll-up did not run between the two reads"
    assert await stored(key_id) == (4, 4, 0)  # the hour is in the key's counters now
    assert after == before
    assert report_after == report_before


async def test_flushes_racing_rollups_count_every_verification_once(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    sent = 0
    for _ in range(8):
        for _ in range(15):
            assert await verify(ws.client, secret) == "VALID"
            sent += 1
        # The flush and a roll-up of the hour the flush writes run at the same time.
        flushed, _ = await asyncio.gather(
            usage.flush(), usage.rollup(now=clock.now() + timedelta(hours=1))
        )
        assert flushed
        assert await shown(ws, key_id) == (sent, sent, 0)
    await usage.rollup(now=clock.now() + timedelta(hours=1))
    assert await stored(key_id) == (sent, sent, 0)
    assert await shown(ws, key_id) == (sent, sent, 0)
    total = sum(b.total_requests for b in await UsageBucket.filter(key_id=key_id))
    assert total == sent


async def test_flushed_last_use_keeps_the_exact_microsecond(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """Timestamps travel to PostgreSQL as integer epoch microseconds: nothing is rounded."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
    [(marker, counts)] = [(m, c) for m, c in usage.pending_counts().items() if m[0] == key_id]
    assert counts.last_used is not None and counts.last_used.microsecond  # sub-second part
    assert await usage.flush()
    bucket = await UsageBucket.get(key_id=key_id)
    assert bucket.last_used_at == counts.last_used
    assert bucket.bucket_start == marker[1] == hour_of(counts.last_used)


async def test_a_flush_encoded_in_many_slices_counts_every_key_exactly(
    app: Starlette, rws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a flush encodes its rows FLUSH_SLICE at a time between pauses: made tiny
    here, so 7 keys take several slices."""
    monkeypatch.setattr(usage_module, "FLUSH_SLICE", 2)
    ws, usage = rws, recorder(app)
    keys = [await ws.create_key(permissions=["pdf.read"]) for _ in range(7)]
    for n, (_, secret) in enumerate(keys, start=1):
        assert [await verify(ws.client, secret) for _ in range(n)] == ["VALID"] * n
        assert await verify(ws.client, secret, "admin.all") == "INSUFFICIENT_PERMISSIONS"
    assert await usage.flush()
    for n, (key_id, _) in enumerate(keys, start=1):
        assert await shown(ws, key_id) == (n + 1, n, 1)
        bucket = await UsageBucket.get(key_id=key_id)
        assert (bucket.total_requests, bucket.rolled) == (n + 1, False)
    env = (await ws.q(ENV_USAGE, {"env": None}))["usage"]["totals"]
    assert env["totalRequests"] == sum(n + 1 for n in range(1, 8))


async def test_each_process_writes_its_own_bucket_rows_and_the_rollup_merges_them(
    app: Starlette, rws: WorkspaceHandle, settings: Settings, clock: OffsetClock
) -> None:
    """Two processes (two recorders) counting one key in one hour never share a row, so they
    never wait on each other's locks; the usage shown is their sum, and the roll-up leaves one
    row per hour on PostgreSQL."""
    ws, usage = rws, recorder(app)
    other = UsageRecorder(settings, clock)
    assert other.writer != usage.writer
    key_id, secret = await ws.create_key()
    key = record_from_model(
        await ApiKey.get(public_id=key_id).select_related("environment", "workspace", "role")
    )
    assert [await verify(ws.client, secret) for _ in range(4)] == ["VALID"] * 4
    for _ in range(6):
        other.record(
            now=clock.now(), code="VALID", key=key, ip="198.19.7.8", origin=None, message=""
        )
    hour = hour_of(clock.now())
    assert await usage.flush() and await other.flush()
    rows = await UsageBucket.filter(key_id=key_id, bucket_start=hour).order_by("total_requests")
    assert [(b.writer, b.total_requests) for b in rows] == [(usage.writer, 4), (other.writer, 6)]
    assert await shown(ws, key_id) == (10, 10, 0)
    env = (await ws.q(ENV_USAGE, {"env": None}))["usage"]["totals"]
    assert env["totalRequests"] == 10

    assert await usage.rollup(now=hour + timedelta(hours=1)) >= 2
    assert await stored(key_id) == (10, 10, 0)
    assert await shown(ws, key_id) == (10, 10, 0)
    rows = await UsageBucket.filter(key_id=key_id)
    assert sum(b.total_requests for b in rows) == 10 and all(b.rolled for b in rows)
    if BACKEND == "postgres":
        assert [(b.writer, b.total_requests) for b in rows] == [(MERGED_WRITER, 10)]


@pytest.mark.skipif(BACKEND != "postgres", reason="updates by row ID are the PostgreSQL flush")
async def test_a_key_flushed_again_in_the_hour_is_updated_by_its_bucket_id(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    assert [await verify(ws.client, secret) for _ in range(2)] == ["VALID"] * 2
    assert await usage.flush()
    [bucket] = await UsageBucket.filter(key_id=key_id)
    assert tally(app, secret).bucket_id == bucket.id
    assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
    assert await usage.flush()
    [again] = await UsageBucket.filter(key_id=key_id)
    assert (again.id, again.total_requests, again.rolled) == (bucket.id, 5, False)
    assert await shown(ws, key_id) == (5, 5, 0)


@pytest.mark.skipif(BACKEND != "postgres", reason="updates by row ID are the PostgreSQL flush")
@pytest.mark.parametrize("meanwhile", ["merged by a roll-up", "deleted"])
async def test_a_bucket_row_gone_before_its_update_by_id_is_written_again(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock, meanwhile: str
) -> None:
    """The row ID a process remembers can go (another process's clock already in the next hour
    merged it; the row was deleted): the update by ID finds nothing, and the flush upserts the
    counts instead: none is lost."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    assert [await verify(ws.client, secret) for _ in range(2)] == ["VALID"] * 2
    assert await usage.flush()
    remembered = tally(app, secret).bucket_id
    if meanwhile == "deleted":
        await UsageBucket.filter(id=remembered).delete()
        expected = 3
    else:
        assert await usage.rollup(now=hour_of(clock.now()) + timedelta(hours=1)) >= 1
        expected = 5
    assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
    assert await usage.flush()
    assert await shown(ws, key_id) == (expected, expected, 0)
    [pending] = await UsageBucket.filter(key_id=key_id, rolled=False)
    assert pending.total_requests == 3 and pending.writer == usage.writer
    assert tally(app, secret).bucket_id == pending.id != remembered


@pytest.mark.skipif(BACKEND != "postgres", reason="statements and pauses of the PostgreSQL flush")
async def test_a_flush_spread_over_several_statements_with_pauses_counts_every_request(
    app: Starlette, rws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one row per slice and two per statement, a flush of five keys (known rows, a row
    gone meanwhile, new rows) runs several statements in its one transaction, pauses between
    them within its budget, and every request is counted once."""
    ws, usage = rws, recorder(app)
    monkeypatch.setattr(usage_module, "FLUSH_SLICE", 1)
    monkeypatch.setattr(usage_module, "FLUSH_STATEMENT_ROWS", 2)
    keys = [await ws.create_key() for _ in range(5)]
    assert await usage.flush()  # nothing pending but these keys' verifications from here on
    async with usage._lock:  # no background flush takes part of them
        for _, secret in keys[:4]:
            assert await verify(ws.client, secret) == "VALID"
    assert await usage.flush()  # four new rows: upserted, two statements
    await UsageBucket.filter(id=tally(app, keys[0][1]).bucket_id).delete()
    statements: list[str] = []
    budgets: list[float] = []  # each statement's pause is taken from the flush's budget
    query = usage_module._Paced.query

    async def counted(paced: usage_module._Paced, sql: str, values: list[object]) -> list[object]:
        statements.append("update" if sql == usage_module._PG_UPDATE_KEYS else "upsert")
        rows = await query(paced, sql, values)
        budgets.append(paced.budget)
        return rows

    monkeypatch.setattr(usage_module._Paced, "query", counted)
    async with usage._lock:
        for _ in range(3):
            for _, secret in keys:
                assert await verify(ws.client, secret) == "VALID"
    assert await usage.flush()
    # Four known rows in two updates (one row found gone), then the new key and the gone one.
    assert statements == ["update", "update", "upsert", "upsert"]
    budget = usage.settings.flush_interval_seconds / 2
    pauses = [a - b for a, b in zip([budget, *budgets], budgets, strict=False)]
    assert pauses[0] == 0 and all(p > 0 for p in pauses[1:]) and sum(pauses) <= budget
    for index, (key_id, _) in enumerate(keys):
        expected = 3 if index in (0, 4) else 4
        assert await shown(ws, key_id) == (expected, expected, 0)


async def test_a_key_deleted_before_the_flush_keeps_its_last_uses(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """Usage history outlives a key: verifications counted before it was deleted and not yet
    written still land in its bucket and its environment's (the flush writes a key's IDs from
    the record it counted, not from the key's row)."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    assert await usage.flush()
    async with usage._lock:  # the background flush does not take the counts meanwhile
        codes = [await verify(ws.client, secret) for _ in range(3)]
        codes.append(await verify(ws.client, secret, "admin.all"))
        assert codes == ["VALID"] * 3 + ["INSUFFICIENT_PERMISSIONS"]
        [(_, counts)] = [(m, c) for m, c in usage.pending_counts().items() if m[0] == key_id]
        await ws.q("mutation($id: ID!) { deleteKey(id: $id) { __typename } }", {"id": key_id})
        assert await verify(ws.client, secret) == "INVALID_KEY"
    assert await usage.flush()
    [bucket] = await UsageBucket.filter(key_id=key_id)
    assert (bucket.total_requests, bucket.successful_requests, bucket.failed_requests) == (4, 3, 1)
    assert bucket.last_used_at == counts.last_used is not None and not bucket.rolled
    env = (await ws.q(ENV_USAGE, {"env": None}))["usage"]["totals"]
    assert env["totalRequests"] == 4


async def test_a_key_reloaded_with_counts_pending_on_its_old_record_is_counted_once_per_row(
    app: Starlette, rws: WorkspaceHandle
) -> None:
    """A management change reloads a key into the cache while its old record still holds
    counts: both records' counts are written, the same bucket is never named twice in one
    statement, and the total is exact."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    assert await usage.flush()  # nothing pending but this key's verifications from here on
    async with usage._lock:  # the background flush does not take the counts meanwhile
        assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
        before = tally(app, secret)
        await ws.q(
            """mutation($id: ID!) { updateKey(id: $id,
            input: {permissions: ["pdf.read", "pdf.write"]}) { __typename } }""",
            {"id": key_id},
        )
        assert [await verify(ws.client, secret, "pdf.write") for _ in range(4)] == ["VALID"] * 4
        after = tally(app, secret)
        assert after is not before and (before.total, after.total) == (3, 4)
    assert await usage.flush()
    assert (before.total, after.total) == (0, 0)
    assert await shown(ws, key_id) == (7, 7, 0)
    assert [await verify(ws.client, secret) for _ in range(2)] == ["VALID"] * 2
    assert await usage.flush()
    assert await shown(ws, key_id) == (9, 9, 0)


async def test_counts_pending_when_the_hour_turns_land_in_their_own_hours(
    app: Starlette, rws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """A key's tally holds one hour's counts: verifications after the hour turned, before the
    flush took them, are counted in the new hour; each hour's bucket gets exactly its own."""
    ws, usage = rws, recorder(app)
    key_id, secret = await ws.create_key()
    assert await usage.flush()
    first = hour_of(clock.now())
    assert [await verify(ws.client, secret) for _ in range(2)] == ["VALID"] * 2
    clock.advance(hours=1)
    assert [await verify(ws.client, secret) for _ in range(3)] == ["VALID"] * 3
    assert {hour: c.total for (k, hour), c in usage.pending_counts().items() if k == key_id} == {
        first: 2,
        first + timedelta(hours=1): 3,
    }
    assert await usage.flush()
    assert [await verify(ws.client, secret) for _ in range(4)] == ["VALID"] * 4
    assert await usage.flush()
    buckets = await UsageBucket.filter(key_id=key_id).order_by("bucket_start")
    assert [(b.bucket_start, b.total_requests) for b in buckets] == [
        (first, 2),
        (first + timedelta(hours=1), 7),
    ]
    assert await shown(ws, key_id) == (9, 9, 0)


@pytest.mark.skipif(BACKEND != "postgres", reason="updates by row ID are the PostgreSQL flush")
async def test_a_failed_flush_keeps_the_counts_it_took_by_bucket_id_for_the_next(
    app: Starlette, rws: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush whose update by bucket row ID fails puts the counts it took back: the next flush
    writes each of them once (as an upsert: the counts are kept by key and hour then)."""
    ws, usage = rws, recorder(app)
    keys = [await ws.create_key() for _ in range(3)]
    for _, secret in keys:
        assert await verify(ws.client, secret) == "VALID"
    assert await usage.flush()
    query = usage_module._Paced.query

    async def refused(paced: usage_module._Paced, sql: str, values: list[object]) -> list[object]:
        raise ConnectionRefusedError("database down")

    async with usage._lock:
        for n, (_, secret) in enumerate(keys, start=1):
            assert [await verify(ws.client, secret) for _ in range(n)] == ["VALID"] * n
            assert tally(app, secret).bucket_id is not None  # updated by ID, if all goes well
    monkeypatch.setattr(usage_module._Paced, "query", refused)
    assert not await usage.flush()
    assert usage.pending_requests == 6
    monkeypatch.setattr(usage_module._Paced, "query", query)
    assert await usage.flush()
    assert usage.pending_requests == 0
    for n, (key_id, _) in enumerate(keys, start=1):
        assert await shown(ws, key_id) == (n + 1, n + 1, 0)
        assert sum(b.total_requests for b in await UsageBucket.filter(key_id=key_id)) == n + 1


def test_no_test_starts_within_two_minutes_of_the_hour() -> None:
    """The suite's clock steps past an hour about to turn (conftest `clear_of_the_hour`), so the
    tests above that find one bucket per key and hour are not split by the hour turning."""
    clearance = timedelta(minutes=2)
    for before_the_hour, moved in ((timedelta(seconds=30), True), (timedelta(minutes=30), False)):
        clock = OffsetClock()
        now = clock.now()
        clock.offset = hour_of(now) + timedelta(hours=1) - before_the_hour - now
        offset = clock.offset
        clock.clear_of_the_hour(clearance)
        if moved:
            after = clock.now()
            assert after.minute == 0 and 1 <= after.second < 5, after
            assert clock.offset - offset < before_the_hour + timedelta(seconds=5)
        else:
            assert clock.offset == offset
