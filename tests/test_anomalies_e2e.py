"""The four anomaly detectors fed by real verifications on `/v1/verify` (not by hand-written
rows): each has a case that triggers it and one that does not. The recorders are flushed
explicitly so each step's effect is exact."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from models import KeyPermissionUse
from tests.support import OffsetClock, WorkspaceHandle, verify

ANOMALIES = """query($since: DateTime) {
  anomalies(since: $since) { kind keyId detectedAt detail } }"""
SET_HOURS = """mutation($h: BusinessHoursInput) { setBusinessHours(hours: $h) { __typename } }"""

_ips = itertools.count(1)
Peer = Callable[[], AbstractAsyncContextManager[tuple[str, httpx.AsyncClient]]]


@pytest.fixture
def peer(app: Starlette) -> Peer:
    """Opens a client with a fresh IP of its own (198.18.100.0/22)."""

    @asynccontextmanager
    async def open_peer() -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
        n = next(_ips)
        ip = f"198.18.{100 + n // 250}.{n % 250 + 1}"
        transport = httpx.ASGITransport(app=app, client=(ip, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
            yield ip, client

    return open_peer


async def flush(app: Starlette) -> None:
    assert await app.state.usage.flush()
    await app.state.activity.flush()


async def found(ws: WorkspaceHandle, key_id: str, kind: str) -> list[dict[str, Any]]:
    data = await ws.q(ANOMALIES, {})
    return [a for a in data["anomalies"] if a["keyId"] == key_id and a["kind"] == kind]


async def test_new_ip_through_verify(app: Starlette, ws: WorkspaceHandle, peer: Peer) -> None:
    key_id, secret = await ws.create_key()
    async with peer() as (_, first), peer() as (second_ip, second):
        assert await verify(first, secret) == "VALID"
        await flush(app)
        assert await verify(first, secret) == "VALID"  # the same IP again: not news
        await flush(app)
        assert await found(ws, key_id, "NEW_IP") == []
        assert await verify(second, secret) == "VALID"
        await flush(app)
    hits = await found(ws, key_id, "NEW_IP")
    assert [h["detail"] for h in hits] == [f"first request from {second_ip} in 30 days"]


async def test_a_refused_request_from_a_new_ip_counts_but_an_allowlisted_ip_never_does(
    app: Starlette, ws: WorkspaceHandle, peer: Peer
) -> None:
    async with peer() as (ip_a, a), peer() as (ip_b, b), peer() as (ip_c, c):
        key_id, secret = await ws.create_key(allowedIps=[ip_a, ip_b])
        assert await verify(a, secret) == "VALID"
        assert await verify(b, secret) == "VALID"  # on the allowlist: expected, never news
        await flush(app)
        assert await found(ws, key_id, "NEW_IP") == []
        assert await verify(c, secret) == "IP_NOT_ALLOWED"
        await flush(app)
    hits = await found(ws, key_id, "NEW_IP")
    assert len(hits) == 1 and ip_c in hits[0]["detail"]


async def test_failure_spike_through_verify(app: Starlette, ws: WorkspaceHandle) -> None:
    floor = app.state.settings.failure_spike_floor
    spiky_id, spiky = await ws.create_key(allowedIps=["192.0.2.1"])
    calm_id, calm = await ws.create_key(allowedIps=["192.0.2.1"])
    for _ in range(floor + 5):
        assert await verify(ws.client, spiky) == "IP_NOT_ALLOWED"
    for _ in range(floor // 4):
        assert await verify(ws.client, calm) == "IP_NOT_ALLOWED"  # below the floor
    await flush(app)
    hits = await found(ws, spiky_id, "FAILURE_SPIKE")
    assert len(hits) == 1
    assert hits[0]["detail"].startswith(f"{floor + 5} failed verifications in the last hour")
    assert await found(ws, calm_id, "FAILURE_SPIKE") == []


async def test_off_hours_through_verify(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, secret = await ws.create_key()
    today = clock.now().astimezone(UTC).isoweekday()
    # Open every day but today: any use now is off hours.
    closed_today = [d for d in range(1, 8) if d != today]
    await ws.q(
        SET_HOURS, {"h": {"timeZone": "UTC", "days": closed_today, "startHour": 0, "endHour": 24}}
    )
    assert await verify(ws.client, secret) == "VALID"
    await flush(app)
    hits = await found(ws, key_id, "OFF_HOURS")
    assert len(hits) == 1 and "outside business hours" in hits[0]["detail"]

    # Open around the clock: the same use is not an anomaly.
    await ws.q(
        SET_HOURS,
        {"h": {"timeZone": "UTC", "days": list(range(1, 8)), "startHour": 0, "endHour": 24}},
    )
    assert await found(ws, key_id, "OFF_HOURS") == []


async def test_unused_permission_through_verify(app: Starlette, ws: WorkspaceHandle) -> None:
    key_id, secret = await ws.create_key(permissions=["pdf.read", "pdf.write"])
    assert await verify(ws.client, secret) == "VALID"  # no permission asked for: nothing
    await flush(app)
    assert await found(ws, key_id, "UNUSED_PERMISSION") == []
    assert await verify(ws.client, secret, "pdf.read") == "VALID"
    await flush(app)
    assert await verify(ws.client, secret, "pdf.read") == "VALID"  # exercised before: quiet
    assert await verify(ws.client, secret, "billing.write") == "INSUFFICIENT_PERMISSIONS"
    await flush(app)
    details = sorted(h["detail"] for h in await found(ws, key_id, "UNUSED_PERMISSION"))
    assert details == [
        "asked for permission billing.write, which it does not hold",
        "first use of permission pdf.read",
    ]


async def test_a_hot_key_costs_the_activity_recorder_no_write(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """Once a (key, IP) pair and a permission are stored, seeing them again within the hour is
    not even buffered: the recorder's flush has nothing to write."""
    _, secret = await ws.create_key(permissions=["pdf.read"])
    assert await verify(ws.client, secret, "pdf.read") == "VALID"
    await app.state.activity.flush()
    for _ in range(20):
        assert await verify(ws.client, secret, "pdf.read") == "VALID"
        assert app.state.activity.pending == 0  # not even buffered
    statements = StatementCount()
    logger = logging.getLogger("tortoise.db_client")
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.filters.insert(0, statements)
    try:
        assert await app.state.activity.flush() == 0
    finally:
        logger.removeFilter(statements)
        logger.setLevel(previous)
    assert statements.count == 0


class StatementCount(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.count += 1
        return True


async def test_what_a_refused_caller_asks_for_is_not_recorded(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """A client-side ID is public: without its Origin (ORIGIN_NOT_ALLOWED) anyone could make
    it write any number of permission rows and UNUSED_PERMISSION anomalies. Only a caller that
    passed the key's own checks has its requirements recorded."""
    client_side_id = ws.client_side_ids["production"]
    asked = ",".join(f"flood.p{i}" for i in range(50))
    await app.state.activity.flush()
    assert await verify(ws.client, client_side_id, asked) == "ORIGIN_NOT_ALLOWED"
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    await ws.q(
        "mutation($id: ID!) { setStatus(id: $id, status: DISABLED) { __typename } }",
        {"id": key_id},
    )
    assert await verify(ws.client, secret, "pdf.read,billing.write") == "DISABLED"
    await flush(app)
    assert await KeyPermissionUse.filter(permission__startswith="flood.").count() == 0
    assert await KeyPermissionUse.filter(key_id=key_id).count() == 0
    data = await ws.q(ANOMALIES, {})
    assert [a for a in data["anomalies"] if a["kind"] == "UNUSED_PERMISSION"] == []


async def test_permissions_no_key_could_hold_are_not_recorded_and_the_flush_goes_on(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """Two permissions that shared their first 128 characters were both stored cut to 128:
    the unique index refused the flush, and every later flush, for good. A NUL did the same on
    PostgreSQL. Such texts are not permissions a key could hold: they are not recorded."""
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    long = "a" * 128
    for asked in (f"{long}x", f"{long}y", "Pdf.Read"):
        assert await verify(ws.client, secret, asked) == "INSUFFICIENT_PERMISSIONS"
    response = await ws.client.get("/v1/verify?permissions=pdf.%00x", headers={"X-API-Key": secret})
    assert response.json()["code"] == "INSUFFICIENT_PERMISSIONS"
    assert await verify(ws.client, secret, "pdf.read") == "VALID"
    await flush(app)
    assert app.state.activity.pending == 0
    details = [h["detail"] for h in await found(ws, key_id, "UNUSED_PERMISSION")]
    assert details == ["first use of permission pdf.read"]


async def test_a_client_address_too_long_to_store_does_not_stop_the_activity_flush(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """An IPv6 peer with a zone (`fe80::1%<zone>`) can be longer than `key_ips.ip`: on
    PostgreSQL the write failed, and the flush kept failing with it. Such an address is not
    recorded; the rest of the batch is."""
    key_id, secret = await ws.create_key()
    zoned = "fe80::1%" + "z" * 60
    transport = httpx.ASGITransport(app=app, client=(zoned, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        assert await verify(client, secret, "pdf.read") == "INSUFFICIENT_PERMISSIONS"
    await flush(app)
    assert app.state.activity.pending == 0
    details = [h["detail"] for h in await found(ws, key_id, "UNUSED_PERMISSION")]
    assert details == ["asked for permission pdf.read, which it does not hold"]
