"""Anomaly detectors: each has a case that triggers it and one that does not."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from starlette.applications import Starlette

from app.activity import ActivityRecorder
from app.cache import record_from_model
from app.settings import Settings
from app.verifier import KeyRecord
from models import ApiKey, KeyIp, KeyPermissionUse, UsageBucket
from tests.support import OffsetClock, WorkspaceHandle

ANOMALIES = "query($since: DateTime) { anomalies(since: $since) { kind keyId detectedAt detail } }"
SET_HOURS = """mutation($h: BusinessHoursInput) { setBusinessHours(hours: $h) {
  __typename ... on SetBusinessHoursSuccess { businessHours { timeZone days startHour endHour } }
  ... on Error { code message } } }"""


async def _record(key_id: str) -> KeyRecord:
    key = await ApiKey.get(public_id=key_id).select_related("environment", "workspace", "role")
    return record_from_model(key)


@pytest.fixture
def recorder(app: Starlette, settings: Settings, clock: OffsetClock) -> ActivityRecorder:
    return ActivityRecorder(settings, clock)


async def _kinds(ws: WorkspaceHandle, key_id: str, since: datetime | None = None) -> list[dict]:
    data = await ws.q(ANOMALIES, {"since": since.isoformat() if since else None})
    return [a for a in data["anomalies"] if a["keyId"] == key_id]


async def test_new_ip_after_the_first_is_an_anomaly(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key()
    record = await _record(key_id)
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.10", required=[])
    assert await recorder.flush() == 0  # the first IP sets the baseline
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.10", required=[])
    assert await recorder.flush() == 0  # same IP again: nothing new
    recorder.observe(now=clock.now(), key=record, ip="198.51.100.7", required=[])
    assert await recorder.flush() == 1
    found = await _kinds(ws, key_id)
    assert [a["kind"] for a in found] == ["NEW_IP"]
    assert found[0]["detail"] == "first request from 198.51.100.7 in 30 days"


async def test_a_key_remembers_its_written_ip_until_its_last_seen_needs_a_write(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    """The memo on the key spares the lookup for the IP it last found written, and only that:
    another IP is still seen, and after an hour the same IP is buffered to update last_seen."""
    key_id, _ = await ws.create_key()
    record = await _record(key_id)
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.10", required=[])
    assert await recorder.flush() == 0
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.10", required=[])
    assert record.tally.seen_ip == "192.0.2.10" and recorder.pending == 0
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.10", required=[])
    assert recorder.pending == 0
    recorder.observe(now=clock.now(), key=record, ip="198.51.100.7", required=[])
    assert recorder.pending == 1
    assert await recorder.flush() == 1  # NEW_IP, not hidden by the memo
    later = clock.now() + timedelta(hours=1, seconds=1)
    recorder.observe(now=later, key=record, ip="192.0.2.10", required=[])
    assert recorder.pending == 1  # last_seen is due for a write again
    assert await recorder.flush() == 0
    stored = await KeyIp.get(key_id=key_id, ip="192.0.2.10")
    assert abs(stored.last_seen - later) < timedelta(seconds=1)


async def test_memos_share_their_end_cut_to_the_minute_and_still_spare_the_write(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    """Keys whose written sightings end in the same minute hold one shared time (so a
    verification reads no time object of its key's own). Cut to the minute, a memo ends up to a
    minute early: the request after that looks the stored sighting up again, and it still
    writes nothing until the hour since the write is over."""
    records = [await _record((await ws.create_key())[0]) for _ in range(2)]
    now = clock.now()
    for record in records:
        recorder.observe(now=now, key=record, ip="192.0.2.20", required=[])
    assert await recorder.flush() == 0
    for record in records:
        recorder.observe(now=now, key=record, ip="192.0.2.20", required=[])
    first, second = (record.tally.seen_until for record in records)
    assert first is second
    stored = recorder._stored_ips[(records[0].key_id, "192.0.2.20")]
    exact = stored + timedelta(hours=1)
    assert exact - timedelta(minutes=1) < first <= exact
    late = exact - timedelta(microseconds=1)  # past the memo's end, within the exact hour
    recorder.observe(now=late, key=records[0], ip="192.0.2.20", required=[])
    assert recorder.pending == 0  # no write: the stored sighting is still within its hour
    recorder.observe(now=exact, key=records[0], ip="192.0.2.20", required=[])
    assert recorder.pending == 1  # the hour is over: last_seen is due for a write


async def test_an_ip_seen_long_ago_is_new_again(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key()
    record = await _record(key_id)
    old = clock.now() - timedelta(days=45)
    recorder.observe(now=old, key=record, ip="192.0.2.1", required=[])
    recorder.observe(now=old, key=record, ip="192.0.2.2", required=[])
    await recorder.flush()
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.2", required=[])
    assert await recorder.flush() == 1
    found = await _kinds(ws, key_id)
    assert "192.0.2.2" in found[0]["detail"] and "last seen" in found[0]["detail"]


async def test_allowlisted_ips_never_count_as_new(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key(allowedIps=["203.0.113.0/24"])
    record = await _record(key_id)
    recorder.observe(now=clock.now(), key=record, ip="203.0.113.1", required=[])
    await recorder.flush()
    recorder.observe(now=clock.now(), key=record, ip="203.0.113.99", required=[])
    assert await recorder.flush() == 0
    assert await _kinds(ws, key_id) == []


async def test_first_use_of_a_held_permission_and_a_lacking_one_are_anomalies(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key(permissions=["pdf.*"])
    record = await _record(key_id)
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.3", required=["pdf.render"])
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.3", required=["billing.refund"])
    assert await recorder.flush() == 2
    details = sorted(a["detail"] for a in await _kinds(ws, key_id))
    assert details == [
        "asked for permission billing.refund, which it does not hold",
        "first use of permission pdf.render",
    ]
    # Exercised before: no new anomaly.
    recorder.observe(now=clock.now(), key=record, ip="192.0.2.3", required=["pdf.render"])
    assert await recorder.flush() == 0


async def _bucket(key_id: str, start: datetime, total: int, failed: int, writer: int = 1) -> None:
    key = await ApiKey.get(public_id=key_id)
    await UsageBucket.create(
        workspace_id=key.workspace_id,
        environment_id=key.environment_id,
        key_id=key_id,
        bucket_start=start.replace(minute=0, second=0, microsecond=0),
        total_requests=total,
        successful_requests=total - failed,
        failed_requests=failed,
        writer=writer,
    )


async def test_failure_spike_far_above_the_keys_baseline(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key()
    now = clock.now()
    for hours_ago in range(3, 50):
        await _bucket(key_id, now - timedelta(hours=hours_ago), total=100, failed=1)
    await _bucket(key_id, now, total=100, failed=60)
    found = await _kinds(ws, key_id)
    assert [a["kind"] for a in found] == ["FAILURE_SPIKE"]
    assert found[0]["detail"].startswith("60 failed verifications in the last hour")


async def test_a_spike_is_dated_by_its_hour_and_since_filters_it(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """`detectedAt` is the start of the spike's latest hour, not the `since` asked for; a spike
    whose hour ended before `since`'s hour is not reported (it was, dated `since`)."""
    key_id, _ = await ws.create_key()
    now = clock.now()
    previous_hour = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    await _bucket(key_id, previous_hour, total=100, failed=60)
    since = now - timedelta(hours=2)
    found = await _kinds(ws, key_id, since)
    assert [a["kind"] for a in found] == ["FAILURE_SPIKE"]
    assert datetime.fromisoformat(found[0]["detectedAt"]) == previous_hour
    assert await _kinds(ws, key_id, now) == []  # the spike's hour is before now's hour


async def test_no_spike_below_the_floor_or_near_the_baseline(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    few, _ = await ws.create_key()
    steady, _ = await ws.create_key()
    now = clock.now()
    await _bucket(few, now, total=5, failed=3)  # 3 failures are not a spike
    for hours_ago in range(3, 150):
        await _bucket(steady, now - timedelta(hours=hours_ago), total=100, failed=30)
    await _bucket(steady, now, total=100, failed=40)  # noisy key, but its normal
    assert await _kinds(ws, few) == []
    assert await _kinds(ws, steady) == []


async def test_off_hours_use_is_reported_only_when_business_hours_are_set(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, _ = await ws.create_key()
    # Saturday 2026-11-21 03:00 in Paris is 02:00 UTC; Monday 10:00 Paris is 09:00 UTC.
    saturday_night = datetime(2026, 11, 21, 2, tzinfo=UTC)
    monday_morning = datetime(2026, 11, 23, 9, tzinfo=UTC)
    # That hour was written by two processes: one finding, for the hour's sum.
    await _bucket(key_id, saturday_night, total=30, failed=0, writer=1)
    await _bucket(key_id, saturday_night, total=12, failed=0, writer=2)
    await _bucket(key_id, monday_morning, total=7, failed=0)
    since = datetime(2026, 11, 20, tzinfo=UTC)
    assert await _kinds(ws, key_id, since) == []  # no business hours: no detector
    data = await ws.q(
        SET_HOURS,
        {"h": {"timeZone": "Europe/Paris", "days": [1, 2, 3, 4, 5], "startHour": 9, "endHour": 18}},
    )
    assert data["setBusinessHours"]["businessHours"]["days"] == [1, 2, 3, 4, 5]
    found = await _kinds(ws, key_id, since)
    assert [a["kind"] for a in found] == ["OFF_HOURS"]
    assert found[0]["detail"].startswith("42 requests at Sat 2026-11-21 03:00 Europe/Paris")
    cleared = await ws.q(SET_HOURS, {"h": None})
    assert cleared["setBusinessHours"]["businessHours"] is None
    assert await _kinds(ws, key_id, since) == []


@pytest.mark.parametrize(
    ("hours", "named"),
    [
        ({"timeZone": "Mars/Olympus", "days": [1], "startHour": 9, "endHour": 17}, "Mars/Olympus"),
        ({"timeZone": "UTC", "days": [0, 8], "startHour": 9, "endHour": 17}, "[0, 8]"),
        ({"timeZone": "UTC", "days": [1], "startHour": 18, "endHour": 9}, "startHour=18"),
    ],
)
async def test_bad_business_hours_are_refused_naming_the_value(
    ws: WorkspaceHandle, hours: dict, named: str
) -> None:
    data = await ws.q(SET_HOURS, {"h": hours})
    assert data["setBusinessHours"]["code"] == "VALIDATION_FAILED"
    assert named in data["setBusinessHours"]["message"]


async def test_anomalies_are_scoped_to_the_workspace(
    ws: WorkspaceHandle,
    other_ws: WorkspaceHandle,
    recorder: ActivityRecorder,
    clock: OffsetClock,
) -> None:
    key_id, _ = await ws.create_key(permissions=["a.b"])
    recorder.observe(now=clock.now(), key=await _record(key_id), ip="192.0.2.9", required=["a.b"])
    await recorder.flush()
    assert await _kinds(ws, key_id) != []
    theirs = await other_ws.q(ANOMALIES)
    assert all(a["keyId"] != key_id for a in theirs["anomalies"])
    env = await ws.raw(
        "query($e: ID) { anomalies(environmentId: $e) { kind } }",
        {"e": other_ws.environments["production"]},
    )
    assert env["errors"][0]["extensions"]["code"] == "NOT_FOUND"


async def test_a_flush_of_more_keys_than_a_statement_can_name_is_written(
    ws: WorkspaceHandle, recorder: ActivityRecorder, clock: OffsetClock
) -> None:
    """A flush reads what the database knows of its keys in chunks, and writes its anomalies in
    batches: with 33,000 keys seen (first sightings after a restart of a busy service), one
    statement naming them all passed PostgreSQL's limit on bound parameters (32,767; SQLite's
    depends on its build), failed, and was retried in vain every second, with no observation
    ever written and the retries taking half the server's CPU (seen on the bench machine, when
    one slow flush let the next one gather that many)."""
    key_id, _ = await ws.create_key()
    real = await _record(key_id)
    now = clock.now()
    for n in range(33_000):
        record = dataclasses.replace(real, key_id=f"key_many{n:05d}")
        recorder.observe(now=now, key=record, ip="192.0.2.10", required=["pdf.read"])
    assert recorder.pending == 66_000
    assert await recorder.flush() == 33_000  # each key asked for a permission it does not hold
    assert recorder.pending == 0
    assert await KeyIp.filter(key_id__startswith="key_many").count() == 33_000
    assert await KeyPermissionUse.filter(key_id__startswith="key_many").count() == 33_000
