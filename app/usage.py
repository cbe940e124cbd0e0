"""Usage counters and the denial log, without a database write per request.

`/v1/verify` calls `record` (O(1), no I/O); a background task calls `flush` every flush interval
and once more on shutdown. A flush writes, in one transaction:

- the keys' lifetime counters (total / successful / failed) and `last_used_at`;
- hourly usage buckets per key, and one per environment (`key_id` = the environment's public
  ID), so the `usage` query reads pre-aggregated rows and never scans raw events;
- the buffered denial rows.

Counting rules (CONTRACT §4): a VALID verification adds a successful request and sets
`lastUsedAt`; a refusal that names a known key adds a failed request. Every refusal is a denial.

Flood folding: each client IP gets `denial_rate_per_ip` denial rows per minute; further refusals
from that IP in the same minute are folded into one row per (IP, code, key) whose `count` says
how many there were. Buffers are bounded: beyond MAX_DENIAL_ROWS pending rows, refusals are
folded into one row per code with IP `(many)`; so memory and the table stay bounded under a
flood of random tokens, and every refusal is still counted.

Nothing is lost on a failed flush: the deltas go back into the buffers and are written by the
next successful flush (counters merge, so nothing is counted twice). Denial rows older than
`denial_retention_days` are pruned by the service itself; usage buckets are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.expressions import F, Q
from tortoise.transactions import in_transaction

from app.background import Periodic
from app.clock import Clock
from app.db import DATABASE_ERRORS
from app.settings import Settings
from app.verifier import KeyRecord
from models import ApiKey, Denial, UsageBucket, Workspace

logger = logging.getLogger("keyplane.usage")

MAX_DENIAL_ROWS = 50_000  # pending denial rows kept in memory between flushes
MAX_TRACKED_IPS = 100_000  # per-minute rate counters; beyond this every IP is over its rate
MANY_IPS = "(many)"
ONE_HOUR = timedelta(hours=1)
PRUNE_EVERY_SECONDS = 600.0
MESSAGE_LIMIT = 200
ORIGIN_LIMIT = 300


WRITE_CHUNK = 2000  # (key, hour) rows per flush statement on PostgreSQL

_BUCKET_UPSERT = """ON CONFLICT (key_id, bucket_start) DO UPDATE SET
    total_requests = b.total_requests + EXCLUDED.total_requests,
    successful_requests = b.successful_requests + EXCLUDED.successful_requests,
    failed_requests = b.failed_requests + EXCLUDED.failed_requests"""
_BUCKET_INSERT = """INSERT INTO usage_buckets AS b (workspace_id, environment_id, key_id,
    bucket_start, total_requests, successful_requests, failed_requests)"""
_PG_WRITE_BUCKETS = f"""{_BUCKET_INSERT}
SELECT * FROM unnest($1::int[], $2::int[], $3::varchar[], $4::timestamptz[], $5::bigint[],
                     $6::bigint[], $7::bigint[])
{_BUCKET_UPSERT}"""
# The keys' lifetime counters ($1-$5, one row per key) and their hourly buckets ($6-$12, one
# row per key and hour) in one statement.
_PG_WRITE_KEYS = f"""WITH lifetime AS (
    UPDATE api_keys AS k SET
        total_requests = k.total_requests + v.total,
        successful_requests = k.successful_requests + v.ok,
        failed_requests = k.failed_requests + v.failed,
        last_used_at = GREATEST(k.last_used_at, v.last_used)
    FROM unnest($1::int[], $2::bigint[], $3::bigint[], $4::bigint[], $5::timestamptz[])
        AS v(key_pk, total, ok, failed, last_used)
    WHERE k.id = v.key_pk
)
{_BUCKET_INSERT}
SELECT * FROM unnest($6::int[], $7::int[], $8::varchar[], $9::timestamptz[], $10::bigint[],
                     $11::bigint[], $12::bigint[])
{_BUCKET_UPSERT}"""


def _key_order(item: tuple[tuple[str, datetime], _Counts]) -> tuple[int, datetime]:
    return item[1].key_pk, item[0][1]


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour holding `moment` (the bucket it is counted in)."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(slots=True)
class _Counts:
    """One key's verifications in one hour (the unit a flush writes), or one environment's."""

    key_pk: int
    workspace_pk: int
    environment_pk: int
    environment_id: str
    total: int = 0
    successful: int = 0
    failed: int = 0
    last_used: datetime | None = None

    def add(self, other: _Counts) -> None:
        self.total += other.total
        self.successful += other.successful
        self.failed += other.failed
        if other.last_used is not None and (
            self.last_used is None or other.last_used > self.last_used
        ):
            self.last_used = other.last_used


@dataclass
class _Denial:
    at: datetime
    ip: str
    code: str
    message: str
    key: KeyRecord | None
    origin: str | None
    prefix: str | None  # the token's workspace prefix when the token was well-formed
    count: int = 1


@dataclass
class _Buffers:
    # (key ID, hour) -> that key's counts in that hour. One entry per key and hour is all a
    # verification touches; a flush derives the keys' lifetime deltas and the environments'
    # buckets from these.
    keys: dict[tuple[str, datetime], _Counts] = field(default_factory=dict)
    denials: list[_Denial] = field(default_factory=list)
    folded: dict[tuple[str, str, str | None, datetime], _Denial] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.keys or self.denials or self.folded)

    def requests(self) -> int:
        return sum(c.total for c in self.keys.values())

    def lifetimes(self) -> dict[str, _Counts]:
        """Per key ID: its deltas summed over the hours in this batch."""
        out: dict[str, _Counts] = {}
        for (key_id, _), counts in self.keys.items():
            seen = out.get(key_id)
            if seen is None:
                out[key_id] = _Counts(
                    counts.key_pk,
                    counts.workspace_pk,
                    counts.environment_pk,
                    counts.environment_id,
                    counts.total,
                    counts.successful,
                    counts.failed,
                    counts.last_used,
                )
            else:
                seen.add(counts)
        return out

    def environments(self) -> dict[tuple[str, datetime], _Counts]:
        """Per (environment public ID, hour): the sum of its keys' counts."""
        out: dict[tuple[str, datetime], _Counts] = {}
        for (_, hour), counts in self.keys.items():
            marker = (counts.environment_id, hour)
            seen = out.get(marker)
            if seen is None:
                seen = out[marker] = _Counts(
                    0, counts.workspace_pk, counts.environment_pk, counts.environment_id
                )
            seen.add(counts)
        return out


class UsageRecorder:
    """Aggregates verifications in memory and writes them in batches."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._buffers = _Buffers()
        self._minute: datetime | None = None
        self._hour_start: datetime | None = None
        self._per_ip: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._loop = Periodic(settings.flush_interval_seconds, self._tick, self._lock)
        self._last_prune = 0.0
        # For /metrics.
        self.last_flush_monotonic = time.monotonic()
        self.flushes = 0
        self.flush_failures = 0
        self.recorded = 0

    # -- the hot path ---------------------------------------------------------------------
    def record(
        self,
        *,
        now: datetime,
        code: str,
        key: KeyRecord | None,
        ip: str,
        origin: str | None,
        message: str,
        prefix: str | None = None,
    ) -> None:
        """Count one verification. O(1), no I/O. `prefix`: the key prefix of a well-formed but
        unknown token, to attribute its denial to the workspace that uses that prefix."""
        self.recorded += 1
        valid = code == "VALID"
        if key is not None:
            self._count(key, now, valid)
        if valid:
            return
        minute = now.replace(second=0, microsecond=0)
        if minute != self._minute:
            self._minute = minute
            self._per_ip.clear()
        seen = self._per_ip.get(ip)
        if seen is None:
            if len(self._per_ip) < MAX_TRACKED_IPS:
                self._per_ip[ip] = 1
                seen = 0
            else:
                seen = self.settings.denial_rate_per_ip  # too many IPs this minute: fold
        else:
            self._per_ip[ip] = seen + 1
        buffers = self._buffers
        if seen < self.settings.denial_rate_per_ip and len(buffers.denials) < MAX_DENIAL_ROWS:
            buffers.denials.append(
                _Denial(now, ip, code, message[:MESSAGE_LIMIT], key, origin, prefix)
            )
            return
        fold_ip = ip if len(buffers.folded) < MAX_DENIAL_ROWS else MANY_IPS
        marker = (fold_ip, code, key.key_id if key else None, minute)
        folded = buffers.folded.get(marker)
        if folded is None:
            buffers.folded[marker] = _Denial(
                now,
                fold_ip,
                code,
                f"{message[:120]} (folded: over {self.settings.denial_rate_per_ip}/min per IP)",
                key,
                None,
                prefix,
                0,
            )
            folded = buffers.folded[marker]
        folded.count += 1
        folded.at = max(folded.at, now)

    def _hour(self, now: datetime) -> datetime:
        """`hour_of(now)`, remembered for the rest of the hour (the hot path asks every time)."""
        start = self._hour_start
        if start is None or not start <= now < start + ONE_HOUR:
            start = self._hour_start = hour_of(now)
        return start

    def _count(self, key: KeyRecord, now: datetime, valid: bool) -> None:
        marker = (key.key_id, self._hour(now))
        counts = self._buffers.keys.get(marker)
        if counts is None:
            counts = self._buffers.keys[marker] = _Counts(
                key.key_pk, key.workspace_pk, key.environment_pk, key.environment_id
            )
        counts.total += 1
        if valid:
            counts.successful += 1
            if counts.last_used is None or now > counts.last_used:
                counts.last_used = now
        else:
            counts.failed += 1

    # -- writing --------------------------------------------------------------------------
    @property
    def pending_requests(self) -> int:
        """Verifications of known keys counted in memory and not yet written."""
        return self._buffers.requests()

    @property
    def pending_denials(self) -> int:
        return len(self._buffers.denials) + len(self._buffers.folded)

    async def flush(self) -> bool:
        """Write everything buffered. Returns False (keeping the deltas) when the database
        could not take it."""
        async with self._lock:
            batch, self._buffers = self._buffers, _Buffers()
            if batch.empty():
                self.last_flush_monotonic = time.monotonic()
                return True
            try:
                await self._write(batch)
            except DATABASE_ERRORS as exc:
                self.flush_failures += 1
                logger.warning(
                    "usage flush failed (%s); keeping %d requests and %d denials for the next",
                    type(exc).__name__,
                    batch.requests(),
                    len(batch.denials) + len(batch.folded),
                )
                self._merge_back(batch)
                return False
            except Exception:  # a bug, not an outage: say so loudly, and still lose nothing
                self.flush_failures += 1
                logger.exception("usage flush crashed; keeping the batch for the next attempt")
                self._merge_back(batch)
                return False
            self.flushes += 1
            self.last_flush_monotonic = time.monotonic()
            return True

    def _merge_back(self, batch: _Buffers) -> None:
        current = self._buffers
        for marker, counts in batch.keys.items():
            if marker in current.keys:
                counts.add(current.keys[marker])
            current.keys[marker] = counts
        room = MAX_DENIAL_ROWS - len(current.denials)
        current.denials[:0] = batch.denials[:room]
        for overflow in batch.denials[room:]:
            self._fold_overflow(current, overflow)
        for fold, denial in batch.folded.items():
            existing = current.folded.get(fold)
            if existing is None:
                current.folded[fold] = denial
            else:
                existing.count += denial.count

    @staticmethod
    def _fold_overflow(buffers: _Buffers, denial: _Denial) -> None:
        minute = denial.at.replace(second=0, microsecond=0)
        folded_marker = (
            MANY_IPS,
            denial.code,
            denial.key.key_id if denial.key else None,
            minute,
        )
        existing = buffers.folded.get(folded_marker)
        if existing is None:
            denial.ip = MANY_IPS
            denial.origin = None
            buffers.folded[folded_marker] = denial
        else:
            existing.count += denial.count

    async def _write(self, batch: _Buffers) -> None:
        denials = [*batch.denials, *batch.folded.values()]
        prefixes = {d.prefix for d in denials if d.key is None and d.prefix}
        owners: dict[str, int] = {}
        if prefixes:
            # An unknown but well-formed token is shown to the workspace whose prefix it
            # carries, when exactly one workspace uses that prefix.
            seen: dict[str, list[int]] = {}
            for ws_pk, prefix in await Workspace.filter(key_prefix__in=prefixes).values_list(
                "id", "key_prefix"
            ):
                seen.setdefault(str(prefix), []).append(int(ws_pk))
            owners = {p: pks[0] for p, pks in seen.items() if len(pks) == 1}
        async with in_transaction() as conn:
            if self.settings.is_postgres:
                await self._write_counts_postgres(conn, batch)
            else:
                await self._write_counts_orm(conn, batch)
            if denials:
                await Denial.bulk_create(
                    [
                        Denial(
                            workspace_id=d.key.workspace_pk
                            if d.key
                            else owners.get(d.prefix or ""),
                            environment_id=d.key.environment_pk if d.key else None,
                            key_id=d.key.key_id if d.key else None,
                            at=d.at,
                            ip=d.ip[:45],
                            origin=d.origin[:ORIGIN_LIMIT] if d.origin else None,
                            code=d.code,
                            message=d.message[:MESSAGE_LIMIT],
                            count=d.count,
                        )
                        for d in denials
                    ],
                    batch_size=1000,
                    using_db=conn,
                )

    @staticmethod
    async def _write_counts_postgres(conn: BaseDBAsyncClient, batch: _Buffers) -> None:
        """One statement per WRITE_CHUNK (key, hour) rows, each updating the keys' lifetime
        counters (by primary key) and upserting their hourly buckets, then one for the
        environments' buckets. Rows go in key order, so two processes flushing the same keys
        lock them in the same order; the event loop gets a turn between chunks."""
        execute = conn.execute_query
        rows = sorted(batch.keys.items(), key=_key_order)
        for start in range(0, len(rows), WRITE_CHUNK):
            chunk = rows[start : start + WRITE_CHUNK]
            lifetime: dict[int, _Counts] = {}
            for _, counts in chunk:
                seen = lifetime.get(counts.key_pk)
                if seen is None:
                    lifetime[counts.key_pk] = _Counts(counts.key_pk, 0, 0, "")
                    seen = lifetime[counts.key_pk]
                seen.add(counts)
            totals = list(lifetime.values())
            await execute(
                _PG_WRITE_KEYS,
                [
                    [c.key_pk for c in totals],
                    [c.total for c in totals],
                    [c.successful for c in totals],
                    [c.failed for c in totals],
                    [c.last_used for c in totals],
                    [c.workspace_pk for _, c in chunk],
                    [c.environment_pk for _, c in chunk],
                    [marker[0] for marker, _ in chunk],
                    [marker[1] for marker, _ in chunk],
                    [c.total for _, c in chunk],
                    [c.successful for _, c in chunk],
                    [c.failed for _, c in chunk],
                ],
            )
        environments = sorted(batch.environments().items())
        if environments:
            await execute(
                _PG_WRITE_BUCKETS,
                [
                    [c.workspace_pk for _, c in environments],
                    [c.environment_pk for _, c in environments],
                    [marker[0] for marker, _ in environments],
                    [marker[1] for marker, _ in environments],
                    [c.total for _, c in environments],
                    [c.successful for _, c in environments],
                    [c.failed for _, c in environments],
                ],
            )

    @staticmethod
    async def _write_counts_orm(conn: BaseDBAsyncClient, batch: _Buffers) -> None:
        """SQLite (one process): per-key increments through the ORM, buckets read then upserted."""
        for key_id, c in batch.lifetimes().items():
            await (
                ApiKey.filter(public_id=key_id)
                .using_db(conn)
                .update(
                    total_requests=F("total_requests") + c.total,
                    successful_requests=F("successful_requests") + c.successful,
                    failed_requests=F("failed_requests") + c.failed,
                )
            )
            if c.last_used is not None:
                await (
                    ApiKey.filter(public_id=key_id)
                    .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=c.last_used))
                    .using_db(conn)
                    .update(last_used_at=c.last_used)
                )
        buckets = {**batch.keys, **batch.environments()}
        if not buckets:
            return
        existing = {
            (b.key_id, b.bucket_start): b
            for b in await UsageBucket.filter(
                key_id__in={m[0] for m in buckets},
                bucket_start__in={m[1] for m in buckets},
            ).using_db(conn)
        }
        new: list[UsageBucket] = []
        for (key_id, start), c in buckets.items():
            row = existing.get((key_id, start))
            if row is None:
                new.append(
                    UsageBucket(
                        workspace_id=c.workspace_pk,
                        environment_id=c.environment_pk,
                        key_id=key_id,
                        bucket_start=start,
                        total_requests=c.total,
                        successful_requests=c.successful,
                        failed_requests=c.failed,
                    )
                )
            else:
                await (
                    UsageBucket.filter(id=row.id)
                    .using_db(conn)
                    .update(
                        total_requests=F("total_requests") + c.total,
                        successful_requests=F("successful_requests") + c.successful,
                        failed_requests=F("failed_requests") + c.failed,
                    )
                )
        if new:
            await UsageBucket.bulk_create(new, batch_size=1000, using_db=conn)

    async def prune(self, now: datetime | None = None) -> int:
        """Delete denial rows older than the retention age; returns how many went."""
        now = now or self.clock.now()
        cutoff = now - timedelta(days=self.settings.denial_retention_days)
        deleted: int = await Denial.filter(at__lt=cutoff).delete()
        return deleted

    # -- the background task --------------------------------------------------------------
    async def _tick(self) -> None:
        await self.flush()
        if time.monotonic() - self._last_prune >= PRUNE_EVERY_SECONDS:
            self._last_prune = time.monotonic()
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.prune()

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop (a flush in progress finishes its write first) and write what is
        left: a clean shutdown loses nothing."""
        await self._loop.stop()
        if not await self.flush():
            logger.error(
                "shutdown flush failed: %d requests and %d denials not written",
                self.pending_requests,
                self.pending_denials,
            )
