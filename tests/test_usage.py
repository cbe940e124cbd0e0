"""Usage counting, the denial log and /metrics, through real verifications on `/v1/verify`.

Counts are buffered in memory and flushed in batches; these tests either call the recorder's
flush (to be exact about what was written) or wait for the background flush (to show the
"visible in GraphQL within 2 s" promise)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import string
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.cache import record_from_model
from app.tokens import KeyType, mint_token
from app.usage import SET_ASIDE_AFTER_CRASHES, UsageRecorder, _ints
from models import ApiKey, Denial, UsageBucket
from tests.conftest import make_workspace
from tests.support import OffsetClock, WorkspaceHandle, flushes_stopped, verify

KEY_USAGE = """query($id: ID!) { key(id: $id) { usage {
    totalRequests successfulRequests failedRequests lastUsedAt } } }"""

USAGE = """query($key: ID, $env: ID, $from: DateTime, $to: DateTime, $g: Granularity) {
  usage(keyId: $key, environmentId: $env, from: $from, to: $to, granularity: $g) {
    totals { totalRequests successfulRequests failedRequests lastUsedAt }
    series { start totalRequests successfulRequests failedRequests } } }"""

DENIALS = """query($key: ID, $ip: String, $code: String, $since: DateTime, $first: Int,
                 $after: String) {
  denials(keyId: $key, ip: $ip, code: $code, since: $since, first: $first, after: $after) {
    edges { cursor node { id at keyId ip origin code message count } }
    pageInfo { hasNextPage endCursor } totalCount } }"""

BY_IP = """query($since: DateTime, $env: ID) {
  denialsByIp(since: $since, environmentId: $env) { ip count lastAt codes } }"""


_peers = itertools.count(1)


@pytest.fixture
async def peer(app: Starlette) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A client with an IP of its own: the per-IP denial rate is shared by every test that
    verifies from the default peer within the same minute."""
    n = next(_peers)
    ip = f"198.18.{n // 250}.{n % 250 + 1}"
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://keyplane.test") as c:
        yield ip, c


@pytest.fixture
def uws(ws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient]) -> WorkspaceHandle:
    """The test workspace, verifying and querying from the test's own IP."""
    return dataclasses.replace(ws, client=peer[1])


def recorder(app: Starlette) -> UsageRecorder:
    usage: UsageRecorder = app.state.usage
    return usage


async def key_usage(ws: WorkspaceHandle, key_id: str) -> dict[str, Any]:
    usage: dict[str, Any] = (await ws.q(KEY_USAGE, {"id": key_id}))["key"]["usage"]
    return usage


async def test_n_verifications_are_exactly_n_counted_requests(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    ws, _ip = uws, peer[0]
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    before = clock.now()
    codes = [await verify(ws.client, secret) for _ in range(37)]
    codes += [await verify(ws.client, secret, permissions="admin.all") for _ in range(5)]
    assert codes.count("VALID") == 37 and codes.count("INSUFFICIENT_PERMISSIONS") == 5
    assert await recorder(app).flush()

    usage = await key_usage(ws, key_id)
    assert usage["totalRequests"] == 42
    assert usage["successfulRequests"] == 37
    assert usage["failedRequests"] == 5
    last_used = datetime.fromisoformat(usage["lastUsedAt"])
    assert before <= last_used <= clock.now()

    # A second batch adds to the first; nothing is counted twice.
    for _ in range(8):
        await verify(ws.client, secret)
    assert await recorder(app).flush()
    assert await recorder(app).flush()  # an empty flush writes nothing
    usage = await key_usage(ws, key_id)
    assert (usage["totalRequests"], usage["successfulRequests"], usage["failedRequests"]) == (
        50,
        45,
        5,
    )
    report = (await ws.q(USAGE, {"key": key_id}))["usage"]
    assert report["totals"]["totalRequests"] == 50
    assert report["totals"]["failedRequests"] == 5
    assert sum(b["totalRequests"] for b in report["series"]) == 50


async def test_counts_and_denials_show_in_graphql_within_two_seconds(
    uws: WorkspaceHandle,
    peer: tuple[str, httpx.AsyncClient],
) -> None:
    """No manual flush: the background task writes within a flush interval (1 s)."""
    ws, ip = uws, peer[0]
    key_id, secret = await ws.create_key(allowedIps=["198.51.100.0/24"])
    ok_id, ok = await ws.create_key()
    used_from = datetime.now(UTC).replace(microsecond=0)
    assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"  # peer is 203.0.113.10
    assert await verify(ws.client, ok) == "VALID"
    started = time.monotonic()
    while True:
        usage = await key_usage(ws, key_id)
        denials = (await ws.q(DENIALS, {"key": key_id}))["denials"]["edges"]
        used = await key_usage(ws, ok_id)
        if usage["failedRequests"] == 1 and denials and used["lastUsedAt"] is not None:
            break
        assert time.monotonic() - started < 2.0, (usage, denials, used)
        await asyncio.sleep(0.05)
    assert used["successfulRequests"] == used["totalRequests"] == 1
    assert datetime.fromisoformat(used["lastUsedAt"]) >= used_from
    node = denials[0]["node"]
    assert node["code"] == "IP_NOT_ALLOWED" and node["ip"] == ip
    assert node["keyId"] == key_id and node["count"] == 1
    assert node["message"] == "IP address not allowed"
    assert usage["lastUsedAt"] is None  # a refusal is not a use


async def test_every_refusal_is_logged_with_key_ip_origin_and_code(
    app: Starlette, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    # A prefix of its own, so an unknown token carrying it is attributed to this workspace.
    prefix = "".join(random.choice(string.ascii_lowercase) for _ in range(10))
    ip, client = peer
    ws = await make_workspace(client, clock, key_prefix=prefix)
    key_id, secret = await ws.create_key(permissions=["pdf.read"])
    client_side = ws.client_side_ids["production"]
    await ws.q(
        """mutation($env: ID!) { setAuthorizedOrigins(environmentId: $env,
             origins: ["https://app.example.com"]) { __typename } }""",
        {"env": ws.environments["production"]},
    )
    since = clock.now()
    unknown = secret[:-8] + ("A" if secret[-8] != "A" else "B") + secret[-7:]
    assert await verify(ws.client, secret, permissions="billing.write") == (
        "INSUFFICIENT_PERMISSIONS"
    )
    assert (
        await verify(ws.client, client_side, headers={"Origin": "https://evil.example"})
        == "ORIGIN_NOT_ALLOWED"
    )
    assert await verify(ws.client, None) == "MISSING_KEY"
    assert await verify(ws.client, unknown) == "INVALID_KEY"
    assert await recorder(app).flush()

    edges = (await ws.q(DENIALS, {"since": since.isoformat()}))["denials"]["edges"]
    codes = [e["node"]["code"] for e in edges]
    # Newest first. MISSING_KEY names no workspace, so it is not in this workspace's log; a
    # well-formed unknown token is, through its prefix, and a corrupted one may not be.
    assert codes == ["ORIGIN_NOT_ALLOWED", "INSUFFICIENT_PERMISSIONS"]
    by_code = {e["node"]["code"]: e["node"] for e in edges}
    assert by_code["INSUFFICIENT_PERMISSIONS"]["keyId"] == key_id
    assert by_code["ORIGIN_NOT_ALLOWED"]["origin"] == "https://evil.example"
    assert all(e["node"]["ip"] == ip for e in edges)
    for edge in edges:
        assert secret not in str(edge) and client_side not in str(edge)
    # Every refusal reached the table, attributed or not.
    rows = await Denial.filter(at__gte=since, ip=ip).values_list("code", flat=True)
    assert {"MISSING_KEY", "INVALID_KEY"} <= set(rows)

    # An unknown token that parses (valid checksum) carries the workspace's prefix.
    stranger = mint_token(prefix, KeyType.SERVER)
    assert await verify(ws.client, stranger) == "INVALID_KEY"
    assert await recorder(app).flush()
    edges = (await ws.q(DENIALS, {"since": since.isoformat(), "code": "INVALID_KEY"}))["denials"]
    assert [e["node"]["keyId"] for e in edges["edges"]] == [None]


async def test_an_origin_that_is_not_one_is_logged_as_sent(
    app: Starlette, uws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """An Origin header that does not parse was logged as no origin at all, which reads as a
    request without the header."""
    client_side = uws.client_side_ids["production"]
    since = clock.now()
    for sent in ("app.example.com", "null"):
        headers = {"Origin": sent}
        assert await verify(uws.client, client_side, headers=headers) == "ORIGIN_NOT_ALLOWED"
    assert await verify(uws.client, client_side) == "ORIGIN_NOT_ALLOWED"
    assert await recorder(app).flush()
    edges = (await uws.q(DENIALS, {"since": since.isoformat()}))["denials"]["edges"]
    assert sorted(str(e["node"]["origin"]) for e in edges) == ["None", "app.example.com", "null"]


async def test_a_flood_from_one_ip_is_folded_into_counts(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    ws, ip = uws, peer[0]
    key_id, secret = await ws.create_key(allowedIps=["198.51.100.7"])
    rate = app.state.settings.denial_rate_per_ip
    since = clock.now()
    flood = 5 * rate
    for _ in range(flood):
        assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
    assert await recorder(app).flush()

    rows = await Denial.filter(key_id=key_id)
    assert sum(r.count for r in rows) == flood  # every refusal counted
    assert len(rows) <= 2 * (rate + 1)  # but not a row each (the run may cross a minute)
    assert any(r.count > 1 and "folded" in r.message for r in rows)
    groups = (await ws.q(BY_IP, {"since": since.isoformat()}))["denialsByIp"]
    assert groups == [
        {
            "ip": ip,
            "count": flood,
            "lastAt": groups[0]["lastAt"],
            "codes": ["IP_NOT_ALLOWED"],
        }
    ]
    usage = await key_usage(ws, key_id)
    assert usage["failedRequests"] == flood


async def test_denials_by_ip_orders_by_count_and_filters_by_environment(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    ws, ip = uws, peer[0]
    _, prod = await ws.create_key(allowedIps=["192.0.2.1"])
    _, dev = await ws.create_key("development", allowedIps=["192.0.2.1"])
    since = clock.now()
    transport = httpx.ASGITransport(app=app, client=("198.51.100.99", 1000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as other:
        for _ in range(3):
            assert await verify(other, dev) == "IP_NOT_ALLOWED"
    assert await verify(ws.client, prod) == "IP_NOT_ALLOWED"
    assert await recorder(app).flush()

    groups = (await ws.q(BY_IP, {"since": since.isoformat()}))["denialsByIp"]
    assert [(g["ip"], g["count"]) for g in groups] == [("198.51.100.99", 3), (ip, 1)]
    only_prod = (
        await ws.q(BY_IP, {"since": since.isoformat(), "env": ws.environments["production"]})
    )["denialsByIp"]
    assert [(g["ip"], g["count"]) for g in only_prod] == [(ip, 1)]
    last_at = datetime.fromisoformat(groups[0]["lastAt"])
    assert since <= last_at <= clock.now()


async def test_denials_paginate_newest_first_and_filter(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    ws, ip = uws, peer[0]
    key_id, secret = await ws.create_key(permissions=["a"])
    other_id, other = await ws.create_key(permissions=["a"])
    since = clock.now()
    for i in range(7):
        clock.advance(seconds=1)
        assert await verify(ws.client, secret, permissions=f"p{i}") == "INSUFFICIENT_PERMISSIONS"
    await ws.q(
        """mutation($id: ID!) { revoke(id: $id, graceMinutes: 0) { __typename } }""",
        {"id": other_id},
    )
    assert await verify(ws.client, other) == "REVOKED"
    assert await recorder(app).flush()

    seen: list[str] = []
    after = None
    while True:
        page = (
            await ws.q(
                DENIALS, {"key": key_id, "first": 3, "after": after, "since": since.isoformat()}
            )
        )["denials"]
        seen += [e["node"]["message"] for e in page["edges"]]
        assert page["totalCount"] == 7  # every page: all the filters match, not the page
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert len(seen) == 7
    # Newest first: the last permission asked for comes first.
    assert "p6" in seen[0] and "p0" in seen[-1]

    revoked = (await ws.q(DENIALS, {"code": "REVOKED", "since": since.isoformat()}))["denials"]
    assert [e["node"]["keyId"] for e in revoked["edges"]] == [other_id]
    by_ip = (await ws.q(DENIALS, {"ip": ip, "since": since.isoformat()}))["denials"]
    assert len(by_ip["edges"]) == by_ip["totalCount"] == 8


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        ({"code": "NOT_A_CODE"}, "'NOT_A_CODE'"),
        ({"code": "VALID"}, "'VALID'"),
        ({"ip": "999.1.1.1"}, "'999.1.1.1'"),
        ({"key": "key_nope!"}, "key_nope!"),
        ({"first": 1000}, "first=1000"),
        ({"after": "garbage"}, "'garbage'"),
    ],
)
async def test_bad_denial_filters_are_named(
    ws: WorkspaceHandle, variables: dict[str, Any], needle: str
) -> None:
    body = await ws.raw(DENIALS, variables)
    error = body["errors"][0]
    assert error["extensions"]["code"] == "VALIDATION_FAILED", body
    assert needle in error["message"]


async def test_usage_series_has_empty_buckets_and_environment_totals(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    key_id, secret = await ws.create_key()
    second_id, second = await ws.create_key()
    start = clock.now()
    for _ in range(2):
        await verify(ws.client, secret)
    await verify(ws.client, second)
    assert await recorder(app).flush()
    clock.advance(hours=3)
    await verify(ws.client, secret)
    assert await recorder(app).flush()
    end = clock.now()

    window = {"from": (start - timedelta(minutes=1)).isoformat(), "to": end.isoformat()}
    report = (await ws.q(USAGE, {"key": key_id, **window}))["usage"]
    series = report["series"]
    hours = [datetime.fromisoformat(b["start"]) for b in series]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(hours))
    assert 4 <= len(series) <= 5  # the minute before `start` may sit in an earlier hour
    totals = [b["totalRequests"] for b in series]
    assert sum(totals) == 3 and totals.count(0) >= 2  # the empty hours are there, as zeros
    assert report["totals"]["successfulRequests"] == 3

    env = (await ws.q(USAGE, {"env": ws.environments["production"], **window}))["usage"]
    assert env["totals"]["totalRequests"] == 4
    assert datetime.fromisoformat(env["totals"]["lastUsedAt"]) >= start + timedelta(hours=3)
    whole = (await ws.q(USAGE, window))["usage"]
    assert whole["totals"]["totalRequests"] == 4
    daily = (await ws.q(USAGE, {"key": second_id, "g": "DAY", **window}))["usage"]
    assert sum(b["totalRequests"] for b in daily["series"]) == 1
    assert all(datetime.fromisoformat(b["start"]).hour == 0 for b in daily["series"])  # UTC days
    # The per-key buckets in the table are pre-aggregated rows, one per key per hour.
    rows = await UsageBucket.filter(key_id=key_id)
    assert sorted(r.total_requests for r in rows) == [1, 2]


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        (
            {"from": "2026-01-01T00:00:00+00:00", "to": "2026-06-01T00:00:00+00:00"},
            "at most 90 days",
        ),
        (
            {"from": "2024-01-01T00:00:00+00:00", "to": "2026-01-01T00:00:00+00:00", "g": "DAY"},
            "at most 400 days",
        ),
        (
            {"from": "2026-02-01T00:00:00+00:00", "to": "2026-01-01T00:00:00+00:00"},
            "must be before",
        ),
        ({"from": "2026-02-01T00:00:00"}, "no time-zone offset"),
        ({"key": "key_doesnotexist"}, "key_doesnotexist"),
        ({"env": "nope"}, "'nope'"),
    ],
)
async def test_bad_usage_ranges_are_refused_with_the_value(
    ws: WorkspaceHandle, variables: dict[str, Any], needle: str
) -> None:
    body = await ws.raw(USAGE, variables)
    assert body["data"] is None
    error = body["errors"][0]
    assert error["extensions"]["code"] in {"VALIDATION_FAILED", "NOT_FOUND"}, body
    assert needle in error["message"], error


async def test_usage_and_denials_are_scoped_to_the_workspace(
    app: Starlette,
    uws: WorkspaceHandle,
    peer: tuple[str, httpx.AsyncClient],
    other_ws: WorkspaceHandle,
) -> None:
    ws, _ip = uws, peer[0]
    key_id, secret = await ws.create_key(allowedIps=["192.0.2.1"])
    assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
    assert await recorder(app).flush()
    body = await other_ws.raw(USAGE, {"key": key_id})
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    body = await other_ws.raw(DENIALS, {"key": key_id})
    assert body["errors"][0]["extensions"]["code"] == "NOT_FOUND"
    assert (await other_ws.q(DENIALS, {}))["denials"]["edges"] == []
    assert (await other_ws.q(BY_IP, {}))["denialsByIp"] == []
    assert (await other_ws.q(USAGE, {}))["usage"]["totals"]["totalRequests"] == 0


async def test_old_denials_are_pruned_and_usage_buckets_stay(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    ws, _ip = uws, peer[0]
    key_id, secret = await ws.create_key(allowedIps=["192.0.2.1"])
    assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
    assert await recorder(app).flush()
    assert await Denial.filter(key_id=key_id).count() == 1
    retention = app.state.settings.denial_retention_days
    assert await recorder(app).prune(clock.now() + timedelta(days=retention - 1)) >= 0
    assert await Denial.filter(key_id=key_id).count() == 1  # still inside retention
    assert await recorder(app).prune(clock.now() + timedelta(days=retention, minutes=1)) >= 1
    assert await Denial.filter(key_id=key_id).count() == 0
    assert await UsageBucket.filter(key_id=key_id).count() == 1  # aggregates stay
    assert (await key_usage(ws, key_id))["failedRequests"] == 1


async def test_metrics_count_verifications_by_code(app: Starlette, ws: WorkspaceHandle) -> None:
    _, secret = await ws.create_key()
    before = (await ws.client.get("/metrics")).text
    for _ in range(3):
        await verify(ws.client, secret)
    await verify(ws.client, None)
    response = await ws.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text

    def sample(body: str, name: str) -> float:
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    valid = 'keyplane_verifications_total{code="VALID"}'
    missing = 'keyplane_verifications_total{code="MISSING_KEY"}'
    assert sample(text, valid) - sample(before, valid) == 3
    assert sample(text, missing) - sample(before, missing) == 1
    inf = 'keyplane_verification_duration_seconds_bucket{code="VALID",le="+Inf"}'
    assert sample(text, inf) == sample(text, valid)
    assert sample(text, 'keyplane_verification_duration_seconds_count{code="VALID"}') == sample(
        text, valid
    )
    assert 0.0 < sample(text, "keyplane_cache_hit_ratio") <= 1.0
    assert "keyplane_usage_flush_lag_seconds" in text
    assert "# TYPE keyplane_verification_duration_seconds histogram" in text
    assert secret not in text


async def test_metrics_print_large_counters_exactly(app: Starlette, ws: WorkspaceHandle) -> None:
    """Prometheus takes rates of counters: a busy server's counts must not be rounded to six
    significant digits (`1.23457e+07`)."""
    cache = app.state.key_cache
    cache.hits += 12_345_678  # as if the server had answered that many from memory
    try:
        lines = (await ws.client.get("/metrics")).text.splitlines()
        line = next(x for x in lines if x.startswith("keyplane_cache_hits_total "))
        assert int(line.split()[1]) == cache.hits
        ratio = next(x for x in lines if x.startswith("keyplane_cache_hit_ratio "))
        assert float(ratio.split()[1]) == cache.hits / (cache.hits + cache.misses)
    finally:
        cache.hits -= 12_345_678


async def test_clean_shutdown_writes_every_count(
    database_url: str, client: httpx.AsyncClient, clock: OffsetClock, ws: WorkspaceHandle
) -> None:
    """A live server with a flush interval of an hour: only the shutdown flush can write."""
    from tests.live import live_server

    key_id, secret = await ws.create_key(allowedIps=["192.0.2.1"])
    ok_id, ok = await ws.create_key()
    with live_server(database_url, {"KEYPLANE_FLUSH_INTERVAL_SECONDS": "3600"}) as base:
        async with httpx.AsyncClient(base_url=base) as live:
            for _ in range(25):
                assert await verify(live, ok) == "VALID"
            for _ in range(4):
                assert await verify(live, secret) == "IP_NOT_ALLOWED"
            metrics = (await live.get("/metrics")).text
            assert "keyplane_usage_pending_requests 29" in metrics
        assert (await key_usage(ws, ok_id))["totalRequests"] == 0  # nothing flushed yet
    # live_server sent SIGTERM and waited: the lifespan flushed on the way out.
    assert (await key_usage(ws, ok_id))["successfulRequests"] == 25
    assert (await key_usage(ws, key_id))["failedRequests"] == 4
    assert await Denial.filter(key_id=key_id).count() == 4
    assert datetime.now(UTC) - datetime.fromisoformat(
        (await key_usage(ws, ok_id))["lastUsedAt"]
    ) < timedelta(minutes=5)


@pytest.mark.parametrize(
    "query",
    [
        "{ usage { totals { totalRequests } } }",
        "{ denials { edges { node { id } } } }",
        "{ denialsByIp { ip } }",
        "{ anomalies { kind } }",
    ],
)
async def test_monitoring_needs_api_key_view(ws: WorkspaceHandle, query: str) -> None:
    created = await ws.q(
        """mutation { createManagementToken(name: "writer", permissions: ["api.key.create"]) {
             __typename ... on CreateManagementTokenSuccess { token } } }"""
    )
    token = created["createManagementToken"]["token"]
    body = await ws.raw(query, token=token)
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert "api.key.view" in body["errors"][0]["message"]


async def test_the_service_prunes_old_denials_by_itself(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """A recorder's background loop prunes on its first round (then every 10 minutes)."""
    key_id, _ = await ws.create_key()
    retention = app.state.settings.denial_retention_days
    old = await Denial.create(
        workspace_id=None,
        key_id=key_id,
        at=clock.now() - timedelta(days=retention, hours=1),
        ip="198.18.230.1",
        code="INVALID_KEY",
        message="old",
    )
    fresh = await Denial.create(
        workspace_id=None,
        key_id=key_id,
        at=clock.now() - timedelta(days=retention - 1),
        ip="198.18.230.1",
        code="INVALID_KEY",
        message="recent",
    )
    settings = dataclasses.replace(app.state.settings, flush_interval_seconds=0.05)
    own = UsageRecorder(settings, clock)
    await own.start()
    try:
        for _ in range(100):
            if not await Denial.exists(id=old.id):
                break
            await asyncio.sleep(0.05)
    finally:
        await own.stop()
    assert not await Denial.exists(id=old.id)
    assert await Denial.exists(id=fresh.id)


async def test_a_bug_in_the_roll_up_neither_stops_the_flushes_nor_loses_counts_at_shutdown(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """The roll-up and the prune catch the database's errors; anything else (a bug) is logged
    and the usage loop goes on: later counts are flushed, and `stop` still writes what is left.
    Before, the loop ended at the bug and `stop` re-raised it, losing every count held."""
    key_id, _ = await ws.create_key()
    key = record_from_model(
        await ApiKey.get(public_id=key_id).select_related("environment", "workspace", "role")
    )
    settings = dataclasses.replace(app.state.settings, flush_interval_seconds=0.05)
    own = UsageRecorder(settings, clock)
    rollups = 0

    async def broken(**_: object) -> int:
        nonlocal rollups
        rollups += 1
        raise ValueError("a bug in the roll-up")

    own.rollup = broken  # type: ignore[method-assign]

    def count(n: int) -> None:
        for _ in range(n):
            own.record(
                now=clock.now(), code="VALID", key=key, ip="198.19.7.9", origin=None, message=""
            )

    async def flushed(done: int) -> bool:
        """Waits until `done` flushes have written (`flushes` counts them after the commit;
        the buffers are swapped out before the write)."""
        for _ in range(200):
            if own.flushes >= done and own.pending_requests == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    await own.start()
    try:
        count(3)
        assert await flushed(1)
        for _ in range(200):  # the tick that wrote them then ran the roll-up, which failed
            if rollups:
                break
            await asyncio.sleep(0.05)
        assert rollups == 1
        written = own.flushes
        count(4)
        assert await flushed(written + 1)  # by a later tick: the loop went on
        count(5)  # left for the shutdown flush (or a last tick)
    finally:
        await own.stop()
    assert rollups == 1 and own.pending_requests == 0
    assert sum(b.total_requests for b in await UsageBucket.filter(key_id=key_id)) == 12


def test_int_columns_are_formatted_as_postgresql_splits_them() -> None:
    """The flush's integer columns: comma-separated decimal texts, as `str` would write them."""
    for values in ([], [0], [1, 2, 0, 10**12, 2**63 - 1], list(range(-3, 300))):
        assert _ints(values) == ",".join(str(value) for value in values)


async def test_denial_text_is_stored_as_valid_utf8(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    """Half a surrogate pair (which the verifier no longer lets into a message) is written as
    its escape: no encoder accepts it, and one such record used to fail every later flush."""
    ws, ip = uws, peer[0]
    key_id, secret = await ws.create_key(allowedIps=["192.0.2.1"])
    usage = recorder(app)
    async with flushes_stopped(usage):
        assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
        usage.record(
            now=clock.now(),
            code="INVALID_KEY",
            key=None,
            ip=ip,
            origin="https://\udc80.test",
            message="x\ud800y",
        )
        assert await usage.flush()
        assert usage.pending_denials == 0
    rows = await Denial.filter(ip=ip, code="INVALID_KEY").values_list("message", "origin")
    assert rows == [("x\\ud800y", "https://\\udc80.test")]
    assert (await ws.q(DENIALS, {"key": key_id}))["denials"]["totalCount"] == 1


async def test_a_denial_no_database_can_store_stops_only_its_own_batch(
    app: Starlette, uws: WorkspaceHandle, peer: tuple[str, httpx.AsyncClient], clock: OffsetClock
) -> None:
    """Defense in depth: should a bug ever let a record no database can take into the denial
    log (here one without an IP), the flush fails, keeps everything, and after
    SET_ASIDE_AFTER_CRASHES failures in a row sets the batch's denial records aside: the
    counts are written, nothing else is lost, and later denials are written again."""
    ws = uws
    key_id, secret = await ws.create_key(allowedIps=["192.0.2.1"])
    usage = recorder(app)
    async with flushes_stopped(usage):
        assert await usage.flush()
        set_aside = usage.denials_set_aside
        usage.record(
            now=clock.now(), code="INVALID_KEY", key=None, ip=None, origin=None, message="bug"
        )
        for _ in range(3):
            assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
        for _ in range(SET_ASIDE_AFTER_CRASHES - 1):
            assert not await usage.flush()  # failed: every count and record kept
            assert usage.pending_requests == 3 and usage.pending_denials == 4
        assert not await usage.flush()  # failed again: its 4 denial records set aside
        assert usage.denials_set_aside == set_aside + 4
        assert usage.pending_requests == 3 and usage.pending_denials == 0
        assert await usage.flush()
        assert (await key_usage(ws, key_id))["failedRequests"] == 3
        # The log takes new records again.
        assert await verify(ws.client, secret) == "IP_NOT_ALLOWED"
        assert await usage.flush()
    denials = (await ws.q(DENIALS, {"key": key_id}))["denials"]
    assert denials["totalCount"] == 1
    metrics = (await ws.client.get("/metrics")).text
    assert f"keyplane_usage_denials_set_aside_total {set_aside + 4}" in metrics
