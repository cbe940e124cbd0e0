"""Benchmark sections measured in-process (httpx over ASGI, no network, one PostgreSQL):

- `usage-query`: the `usage` GraphQL query over 30 days of hourly data for one key and for an
  environment of 1,000 keys (issue "part 3"), against a trivial query as the baseline.
- `refusal-timing`: how long a refused token takes depending on how much of a real key it
  shares (issue "part 4": no early exit on a matching prefix), for well-formed unknown tokens
  (one indexed lookup by SHA-256 each) and for tokens with a bad checksum (no lookup at all).

Medians of many calls; figures are ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from app.db import migrate
from app.main import create_app
from app.services.workspaces import bootstrap
from app.settings import Settings
from app.tokens import BASE62, KeyType, checksum, display_prefix, hash_secret, mint_token
from models import ApiKey, Environment, KeyKind, KeyStatus, Plan

KEYS = 1_000
DAYS = 30
REPEAT = 41


async def _median_ms(call: Callable[[], Awaitable[Any]], repeat: int = REPEAT) -> float:
    for _ in range(3):
        await call()  # warm-up: parser cache, connection pool, page cache
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(samples), 3)


async def _seed(url: str) -> tuple[str, str, str, list[str]]:
    """A workspace whose production environment has KEYS keys and DAYS of hourly buckets for
    each (and the environment's own totals). Returns (token, env ID, one key ID, key secrets)."""
    now = datetime.now(UTC)
    result = await bootstrap("bench-usage", Plan.SCALE_ENTERPRISE, "kp", now)
    env = await Environment.get(workspace_id=result.workspace.id, name="production")
    secrets_: list[str] = []
    keys: list[ApiKey] = []
    for i in range(KEYS):
        token = mint_token("kp", KeyType.SERVER)
        secrets_.append(token)
        keys.append(
            ApiKey(
                public_id=f"key_{i:022d}",
                workspace_id=result.workspace.id,
                environment_id=env.id,
                name=f"bench {i}",
                type=KeyKind.SERVER,
                secret_hash=hash_secret(token),
                prefix=display_prefix(token),
                status=KeyStatus.ENABLED,
                permissions=[],
                allowed_ips=[],
                created_at=now,
                updated_at=now,
            )
        )
    await ApiKey.bulk_create(keys, batch_size=1000)
    first_hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=DAYS)
    hours = [first_hour + timedelta(hours=h) for h in range(DAYS * 24)]
    # Past hours, already rolled up into the keys' counters (app.usage).
    rows = [
        (result.workspace.id, env.id, key.public_id, hour, 10, 9, 1, True)
        for key in keys
        for hour in hours
    ]
    rows += [
        (result.workspace.id, env.id, env.public_id, hour, 10 * KEYS, 9 * KEYS, KEYS, True)
        for hour in hours
    ]
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "usage_buckets",
            records=rows,
            columns=[
                "workspace_id",
                "environment_id",
                "key_id",
                "bucket_start",
                "total_requests",
                "successful_requests",
                "failed_requests",
                "rolled",
            ],
        )
        await conn.execute("ANALYZE usage_buckets")
    finally:
        await conn.close()
    return result.token, env.public_id, keys[0].public_id, secrets_


USAGE = """query($k: ID, $e: ID, $from: DateTime, $g: Granularity) {
  usage(keyId: $k, environmentId: $e, from: $from, granularity: $g) {
    totals { totalRequests } series { start totalRequests } } }"""


async def _measure(url: str) -> dict[str, dict[str, Any]]:
    await migrate(url)
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        seeded = time.perf_counter()
        token, env_id, key_id, key_secrets = await _seed(url)
        seed_seconds = round(time.perf_counter() - seeded, 1)
        transport = httpx.ASGITransport(app=app, client=("203.0.113.5", 1))
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            def graphql(query: str, variables: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
                async def call() -> None:
                    response = await client.post(
                        "/graphql", json={"query": query, "variables": variables}, headers=headers
                    )
                    body = response.json()
                    assert "errors" not in body, body

                return call

            since = (datetime.now(UTC) - timedelta(days=DAYS)).isoformat()
            usage = {
                "seeded_rows": KEYS * DAYS * 24 + DAYS * 24,
                "seed_seconds": seed_seconds,
                "baseline_ms": await _median_ms(graphql("{ workspace { id } }", {})),
                "key_hourly_ms": await _median_ms(
                    graphql(USAGE, {"k": key_id, "from": since, "g": "HOUR"})
                ),
                "key_daily_ms": await _median_ms(
                    graphql(USAGE, {"k": key_id, "from": since, "g": "DAY"})
                ),
                "environment_hourly_ms": await _median_ms(
                    graphql(USAGE, {"e": env_id, "from": since, "g": "HOUR"})
                ),
                "environment_daily_ms": await _median_ms(
                    graphql(USAGE, {"e": env_id, "from": since, "g": "DAY"})
                ),
            }
            usage["key_vs_baseline"] = round(usage["key_hourly_ms"] / usage["baseline_ms"], 2)
            usage["environment_vs_baseline"] = round(
                usage["environment_hourly_ms"] / usage["baseline_ms"], 2
            )

            timing = await _refusal_timing(client, key_secrets[0])
    return {"usage-query": usage, "refusal-timing": timing}


def _sharing(secret: str, shared: int, valid_checksum: bool) -> str:
    """A token with the same prefix and tag as `secret` whose body shares its first `shared`
    characters and then differs."""
    head, body = secret[: secret.rindex("_") + 1], secret[secret.rindex("_") + 1 : -6]
    rest = "".join(secrets.choice(BASE62) for _ in range(len(body) - shared))
    if rest and rest[0] == body[shared]:
        rest = BASE62[(BASE62.index(rest[0]) + 1) % 62] + rest[1:]
    candidate = head + body[:shared] + rest
    if valid_checksum:
        return candidate + checksum(candidate)
    wrong = checksum(candidate)
    return candidate + BASE62[(BASE62.index(wrong[0]) + 1) % 62] + wrong[1:]


async def _refusal_timing(client: httpx.AsyncClient, secret: str) -> dict[str, Any]:
    """Interleaved (one call per length in turn), so machine noise falls on every length alike."""
    body_length = len(secret) - secret.rindex("_") - 1 - 6
    # At most body_length - 3 shared: the rest must leave room for fresh, never-seen tokens
    # (a repeated unknown token would be answered by the negative cache).
    lengths = (0, body_length // 2, body_length - 3)
    seen: set[str] = set()
    figures: dict[str, Any] = {}
    for valid_checksum, label in ((True, "unknown"), (False, "bad_checksum")):
        samples: dict[int, list[float]] = {n: [] for n in lengths}
        for round_ in range(REPEAT * 3 + 5):
            for shared in lengths:
                token = _sharing(secret, shared, valid_checksum)
                while token in seen:
                    token = _sharing(secret, shared, valid_checksum)
                seen.add(token)
                started = time.perf_counter()
                response = await client.get("/v1/verify", headers={"X-API-Key": token})
                took = (time.perf_counter() - started) * 1000
                assert response.status_code == 401
                if round_ >= 5:
                    samples[shared].append(took)
        per_length: dict[str, float] = {
            f"shared_{n}_of_{body_length}_ms": round(statistics.median(v), 3)
            for n, v in samples.items()
        }
        values = list(per_length.values())
        per_length["max_over_min"] = round(max(values) / min(values), 2)
        figures[label] = per_length
    return figures


def run(url: str) -> dict[str, dict[str, Any]]:
    return asyncio.run(_measure(url))
