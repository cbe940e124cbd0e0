"""Usage counters and the denial log, without a database write per request.

`/v1/verify` calls `record` (O(1), no I/O); a background task calls `flush` every flush interval
and once more on shutdown. Each verification of a known key is noted as it came, in flat
arrays per hour (`_Events`: the key's row ID and the moment, two appends and no per-key object);
a failed flush puts its arrays back. A flush writes, in one transaction:

- hourly usage buckets per key (counts and the latest use), and one per environment
  (`key_id` = the environment's public ID), so the `usage` query reads pre-aggregated rows and
  never scans raw events;
- the buffered denial rows.

A key's lifetime counters (`api_keys` total / successful / failed and `last_used_at`) are not
written every second: a key bucket is *pending* until the roll-up (every minute, for the hours
before the current one) adds it to its key's counters and marks it rolled, and a key's totals
are its counters plus its pending buckets (`key_totals`, one indexed statement for a page of
keys). So a flush writes one row per key in use, not two, and the figures are exact at every
moment. A late write into an hour already rolled up (a batch kept through a database outage)
is counted once: on SQLite it adds to the key's counters itself, in the same transaction; on
PostgreSQL it is a new pending row, for the next roll-up. The roll-up skips buckets a flush
holds, so each delta is counted once whichever runs first, with any number of processes.

Each process writes bucket rows of its own (`usage_buckets.writer`, random per process), so no
two processes lock the same row and no statement needs a lock order; readers sum a key's rows
per hour. On PostgreSQL the flush sends the verifications themselves, and PostgreSQL sums them
per key and upserts the key rows, and sums the environments' buckets from those, in the same
statements (SQLite: the event loop sums them and writes through the ORM). The PostgreSQL
roll-up merges a closed hour's rows into one (writer MERGED_WRITER) rather than marking them;
on SQLite it marks them rolled in place.

Counting rules (CONTRACT §4): a VALID verification adds a successful request and sets
`lastUsedAt`; a refusal that names a known key adds a failed request. Every refusal is a denial.

Flood folding: each client IP gets `denial_rate_per_ip` denial rows per minute; further refusals
from that IP in the same minute are folded into one row per (IP, code, key) whose `count` says
how many there were. Buffers are bounded: beyond MAX_DENIAL_ROWS pending rows, refusals are
folded into one row per code with IP `(many)`; so memory and the table stay bounded under a
flood of random tokens, and every refusal is still counted.

Nothing is lost on a failed flush: the deltas go back into the buffers and are written by the
next successful flush (counters merge, so nothing is counted twice). A flush that failed at its
COMMIT (the connection dropped after sending it) may have committed: its deltas are held until
the next flush has read its writer's row (`usage_writers`), which the flush's transaction sets to
its own number, and are dropped if it did (`_InDoubt`). Denial rows older than
`denial_retention_days` are pruned by the service itself; usage buckets are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tortoise import connections
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.expressions import F, Q

from app.background import Periodic
from app.clock import Clock
from app.db import DATABASE_ERRORS, any_of, latest, transaction
from app.log_policy import unforeseen
from app.settings import Settings
from app.verifier import KeyRecord
from models import ApiKey, Denial, UsageBucket, UsageWriter, Workspace

logger = logging.getLogger("keyplane.usage")

MAX_DENIAL_ROWS = 50_000  # pending denial rows kept in memory between flushes
MAX_TRACKED_IPS = 100_000  # per-minute rate counters; beyond this every IP is over its rate
MANY_IPS = "(many)"
ONE_HOUR = timedelta(hours=1)
ONE_MICROSECOND = timedelta(microseconds=1)
_NEVER = datetime.min.replace(tzinfo=UTC)
PRUNE_EVERY_SECONDS = 600.0
MESSAGE_LIMIT = 200
ORIGIN_LIMIT = 300
# An hour's verifications held as they came (`_Events`) before they are folded to one entry per
# key and outcome: about 60 MB. Only a flush that cannot write for a long while gets there.
MAX_EVENTS = 1_000_000


# A PostgreSQL flush sends FLUSH_STATEMENT_ROWS rows (one per key and outcome) to a statement
# and, before each statement after its first, pauses FLUSH_PAUSE_FACTOR times as long as the one
# before took, at most half the flush interval in all: PostgreSQL's part of a flush is spread
# over about four times its length instead of one burst that takes a whole core (about 100 ms
# for 15,000 keys). On the two-core bench machine such a burst also took CPU from the server
# under load.
FLUSH_STATEMENT_ROWS = 2000
FLUSH_PAUSE_FACTOR = 3.0
ROLLUP_CHUNK = 5000  # closed buckets added to their keys' counters per roll-up statement
ROLLUP_EVERY_SECONDS = 60.0

MERGED_WRITER = -1  # `usage_buckets.writer` of the row the roll-up merges a closed hour into

# A flush whose COMMIT went unanswered (`_InDoubt`). PostgreSQL ends a flush's transaction that
# sits idle FLUSH_IDLE_SECONDS longer than a flush's pauses can last (its connection lost before
# COMMIT reached the server), releasing its writer row; the check of the next flush waits for that
# row at most IN_DOUBT_WAIT_SECONDS at a time. Rows of writers not heard of for WRITER_RETENTION
# are pruned.
FLUSH_IDLE_SECONDS = 10.0
IN_DOUBT_WAIT_SECONDS = 2.0
WRITER_RETENTION = timedelta(days=30)

_BUCKET_INSERT = """INSERT INTO usage_buckets AS b (workspace_id, environment_id, key_id,
    bucket_start, total_requests, successful_requests, failed_requests, last_used_at, rolled,
    writer)"""
_BUCKET_UPSERT = """ON CONFLICT (key_id, bucket_start, writer) DO UPDATE SET
    total_requests = b.total_requests + EXCLUDED.total_requests,
    successful_requests = b.successful_requests + EXCLUDED.successful_requests,
    failed_requests = b.failed_requests + EXCLUDED.failed_requests,
    last_used_at = GREATEST(b.last_used_at, EXCLUDED.last_used_at)"""
_ADD_TO_KEYS = """UPDATE api_keys AS k SET
        total_requests = k.total_requests + s.total,
        successful_requests = k.successful_requests + s.ok,
        failed_requests = k.failed_requests + s.failed,
        last_used_at = GREATEST(k.last_used_at, s.last_used)"""


def _add_environments_sql(rows: str, writer: str) -> str:
    """A CTE adding key rows `rows` (ws, env, hour, total, ok, failed, last_used) to their
    environments' buckets (key ID: the environment's public ID), in the statement that writes
    the key rows: PostgreSQL sums them, not the event loop. Environment buckets are never
    pending (they are not part of any key's counters)."""
    return f"""environments AS (
    {_BUCKET_INSERT}
    SELECT s.ws, s.env, e.public_id, s.hour, s.total, s.ok, s.failed, s.last_used, TRUE,
           {writer}::bigint
    FROM (SELECT min(ws) AS ws, env, hour, sum(total) AS total, sum(ok) AS ok,
                 sum(failed) AS failed, max(last_used) AS last_used
          FROM {rows} GROUP BY env, hour) AS s
        JOIN environments e ON e.id = s.env
    {_BUCKET_UPSERT}
)"""


# Every bucket row belongs to one writer (a process: the last parameter below), so no two
# processes ever lock the same row and the statements need no lock order. Key buckets are upserted
# as pending. On PostgreSQL a writer's rows are always pending: the roll-up does not mark them, it
# merges them into a MERGED_WRITER row and deletes them, so a late write for a closed hour lands
# in a new pending row of its own, for the next roll-up.
#
# A flush sends an hour's verifications summed per key and outcome (`_Events`): the key's
# workspace and environment row IDs and public ID (from the record it counted: a key deleted since
# still counts), how many, how many failed, and (successful ones) the last use in microseconds into
# the hour. PostgreSQL adds a key's two outcomes up, upserts its row, and sums the environments'
# rows from those. Taking the IDs from `api_keys` instead tripled PostgreSQL's part (0.28 of a core
# against 0.08 at the bench's 1M full load, on the CPU the load generator shares).
_PG_WRITE_KEYS = f"""WITH e AS (
    SELECT * FROM unnest(string_to_array($1, ',')::int[], string_to_array($2, ',')::int[],
                         string_to_array($3, ',')::varchar[], string_to_array($4, ',')::bigint[],
                         string_to_array($5, ',')::bigint[], string_to_array($6, ',', '')::bigint[])
        AS e(ws, env, key_id, total, failed, last_off)
), v AS (
    SELECT min(e.ws) AS ws, min(e.env) AS env, e.key_id, h.hour, sum(e.total) AS total,
           sum(e.total) - sum(e.failed) AS ok, sum(e.failed) AS failed,
           h.hour + max(e.last_off) * INTERVAL '1 microsecond' AS last_used
    FROM e CROSS JOIN (SELECT TIMESTAMPTZ 'epoch' + $7::bigint * INTERVAL '1 microsecond' AS hour) h
    GROUP BY e.key_id, h.hour
), up AS (
    {_BUCKET_INSERT}
    SELECT ws, env, key_id, hour, total, ok, failed, last_used, FALSE, $8::bigint FROM v
    {_BUCKET_UPSERT}
), {_add_environments_sql("v", "$8")}
SELECT count(*) FROM v"""
# Each flush's transaction first notes its number on its writer's row (`_InDoubt`).
_PG_FLUSHED = """SET LOCAL idle_in_transaction_session_timeout = {idle_ms};
INSERT INTO usage_writers (writer, flushed, at) VALUES ({writer}, {sequence}, now())
ON CONFLICT (writer) DO UPDATE SET flushed = EXCLUDED.flushed, at = EXCLUDED.at"""
# The number of a writer's last committed flush. Written as an upsert, it waits for a transaction
# still holding the row, or still inserting it, to end (a bare SELECT would not see it yet).
_PG_LAST_FLUSHED = """INSERT INTO usage_writers (writer, flushed, at) VALUES ($1, 0, now())
ON CONFLICT (writer) DO UPDATE SET at = usage_writers.at RETURNING flushed"""
# The roll-up: closed key buckets (hours before $1), ROLLUP_CHUNK at a time, added to their keys'
# counters and merged into one rolled row per key and hour (writer MERGED_WRITER), whatever
# number of processes wrote them. Rows a flush holds are skipped and taken by a later pass.
_PG_ROLLUP = f"""WITH c AS (
    DELETE FROM usage_buckets AS b
    WHERE b.id IN (SELECT id FROM usage_buckets WHERE NOT rolled AND bucket_start < $1
                   LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING b.workspace_id, b.environment_id, b.key_id, b.bucket_start, b.total_requests,
              b.successful_requests, b.failed_requests, b.last_used_at
), merged AS (
    {_BUCKET_INSERT}
    SELECT min(workspace_id), min(environment_id), key_id, bucket_start, sum(total_requests),
           sum(successful_requests), sum(failed_requests), max(last_used_at), TRUE,
           {MERGED_WRITER}
    FROM c GROUP BY key_id, bucket_start
    {_BUCKET_UPSERT}
), added AS (
    {_ADD_TO_KEYS}
    FROM (SELECT key_id, sum(total_requests) AS total, sum(successful_requests) AS ok,
                 sum(failed_requests) AS failed, max(last_used_at) AS last_used
          FROM c GROUP BY key_id) AS s
    WHERE k.public_id = s.key_id
)
SELECT count(*) FROM c"""


def _joined(values: Iterable[object]) -> str:
    return ",".join(map(str, values))


def _epoch(moment: datetime) -> int:
    """Epoch microseconds, as the flush statements read timestamps back."""
    return round(moment.timestamp() * 1_000_000)


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour holding `moment` (the bucket it is counted in)."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


@dataclass(slots=True)
class _Counts:
    """One key's verifications in one hour (the unit a flush writes), or one environment's."""

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
    # Hour -> the verifications of known keys counted in it. (A flush derives the environments'
    # buckets from them.)
    events: dict[datetime, _Events] = field(default_factory=dict)
    denials: list[_Denial] = field(default_factory=list)
    folded: dict[tuple[str, str, str | None, datetime], _Denial] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.events or self.denials or self.folded)

    def requests(self) -> int:
        return sum(events.requests() for events in self.events.values())

    def denial_rows(self) -> int:
        return len(self.denials) + len(self.folded)

    def counts(self) -> dict[tuple[str, datetime], _Counts]:
        """Per (key ID, hour): the counts the events add up to."""
        out: dict[tuple[str, datetime], _Counts] = {}
        for hour, events in self.events.items():
            out.update(events.counts(hour))
        return out


def _environments(keys: dict[tuple[str, datetime], _Counts]) -> dict[tuple[str, datetime], _Counts]:
    """Per (environment public ID, hour): the sum of these keys' counts."""
    out: dict[tuple[str, datetime], _Counts] = {}
    _add_environments(out, keys.items())
    return out


def _add_environments(
    out: dict[tuple[str, datetime], _Counts], rows: Iterable[tuple[tuple[str, datetime], _Counts]]
) -> None:
    """Add key rows to their environments' (environment public ID, hour) sums in `out`."""
    for (_, hour), counts in rows:
        marker = (counts.environment_id, hour)
        seen = out.get(marker)
        if seen is None:
            seen = out[marker] = _Counts(
                counts.workspace_pk, counts.environment_pk, counts.environment_id
            )
        seen.add(counts)


def _offsets(moments: list[datetime | None], hour: datetime) -> str:
    """Microseconds from `hour` to each moment (in that UTC hour), comma-separated; an empty
    field for None. In UTC they are read off the moments' fields: a third of the time of
    subtracting, and this runs once per key and hour of a flush."""
    if {m.tzinfo for m in moments if m is not None} <= {UTC}:
        return ",".join(
            [
                ""
                if m is None
                else str(m.minute * 60_000_000 + m.second * 1_000_000 + m.microsecond)
                for m in moments
            ]
        )
    return ",".join(["" if m is None else str((m - hour) // ONE_MICROSECOND) for m in moments])


class _Events:
    """One hour's verifications of known keys, in the order they were counted: the key's row ID
    (negated for a failed verification) in a flat array, and the moment in a list. Counting one
    is two appends and a dict store: no per-key object is read or made on the request path. A
    flush sums them per key in C (`totals`: `Counter`, and a dict built from the pairs, where a
    key's later entries replace its earlier ones) and turns one row per key and outcome into
    text. With 100,000 keys in use, each verified every 14 s or so, the per-key tallies this
    replaced cost the request a write to an object of that key's that no recent request had
    touched, and the flush 3.7 us of Python per verification (7,000 verifications over 7,000
    keys: 24-30 ms of the event loop per flush; now 5-7 ms).

    The last use written is the moment of a key's last verification counted, which is the
    latest one, but for a request that waited on a database lookup while a later one of the same
    key was counted (a few milliseconds earlier, at most). Past MAX_EVENTS entries (a flush that
    cannot write for a long while) the entries are folded into `folded`: per key and outcome,
    how many and the last moment."""

    __slots__ = ("folded", "keys", "moments", "records")

    def __init__(self) -> None:
        self.keys = array("q")
        self.moments: list[datetime] = []
        # Signed row ID -> (verifications, last moment) of entries folded, all before `keys`'.
        self.folded: dict[int, tuple[int, datetime]] = {}
        # Row ID -> the record counted under it: its public and parent IDs, for the rows written.
        self.records: dict[int, KeyRecord] = {}

    def requests(self) -> int:
        return len(self.keys) + sum(n for n, _ in self.folded.values())

    def totals(self) -> tuple[Counter[int], dict[int, datetime]]:
        """Per signed row ID: how many verifications, and the moment of the last one counted."""
        counts = Counter(self.keys)
        last = dict(zip(self.keys, self.moments, strict=True))
        for pk, (n, moment) in self.folded.items():
            counts[pk] += n
            last.setdefault(pk, moment)  # an entry counted since is later
        return counts, last

    def fold(self) -> None:
        counts, last = self.totals()
        self.folded = {pk: (n, last[pk]) for pk, n in counts.items()}
        self.keys = array("q")
        self.moments = []

    def put_back(self, older: _Events) -> None:
        """Add the entries of `older` (a failed flush's, all counted before these)."""
        for pk, record in older.records.items():
            self.records.setdefault(pk, record)
        if not older.folded and not self.folded:
            self.keys = older.keys + self.keys
            self.moments = older.moments + self.moments
        else:
            counts, last = self.totals()
            more, before = older.totals()
            counts.update(more)
            self.folded = {pk: (n, last.get(pk) or before[pk]) for pk, n in counts.items()}
            self.keys = array("q")
            self.moments = []
        if len(self.keys) > MAX_EVENTS:
            self.fold()

    def columns(self, hour: datetime) -> list[list[str]]:
        """PostgreSQL: the rows, one per key and outcome, as the text columns `_PG_WRITE_KEYS`
        reads, FLUSH_STATEMENT_ROWS rows to a statement."""
        counts, last = self.totals()
        pks = list(counts)
        out: list[list[str]] = []
        for start in range(0, len(pks), FLUSH_STATEMENT_ROWS):
            part = pks[start : start + FLUSH_STATEMENT_ROWS]
            records = [self.records[abs(pk)] for pk in part]
            out.append(
                [
                    _joined([r.workspace_pk for r in records]),
                    _joined([r.environment_pk for r in records]),
                    ",".join([r.key_id for r in records]),
                    _joined(map(counts.__getitem__, part)),
                    _joined([counts[pk] if pk < 0 else 0 for pk in part]),
                    _offsets([None if pk < 0 else last[pk] for pk in part], hour),
                ]
            )
        return out

    def counts(self, hour: datetime) -> dict[tuple[str, datetime], _Counts]:
        """Per (key ID, hour): what these entries add up to."""
        counts, last = self.totals()
        out: dict[tuple[str, datetime], _Counts] = {}
        for pk, n in counts.items():
            record = self.records[abs(pk)]
            marker = (record.key_id, hour)
            found = out.get(marker)
            if found is None:
                found = out[marker] = _Counts(
                    record.workspace_pk, record.environment_pk, record.environment_id
                )
            found.total += n
            if pk < 0:
                found.failed += n
            else:
                found.successful += n
                found.last_used = last[pk]
        return out


class _Paced:
    """One flush's statements on its connection, a pause before each after the first
    (FLUSH_PAUSE_FACTOR times the one before, `budget` seconds in all)."""

    def __init__(self, conn: BaseDBAsyncClient, budget: float) -> None:
        self.conn = conn
        self.budget = budget
        self._took = 0.0

    async def query(self, sql: str, values: list[Any]) -> list[Any]:
        if self._took:
            pause = min(self._took * FLUSH_PAUSE_FACTOR, self.budget)
            self.budget -= pause
            await asyncio.sleep(pause)
        started = time.perf_counter()
        _, rows = await self.conn.execute_query(sql, values)
        self._took = time.perf_counter() - started
        return list(rows)


@dataclass
class _Attempt:
    """One flush: its number, and whether its transaction got as far as its COMMIT."""

    sequence: int
    committing: bool = False


@dataclass
class _InDoubt:
    """A flush whose COMMIT went unanswered: the connection dropped after the COMMIT was sent,
    so the server may have committed it or not. Putting its counts back, as for any other failed
    flush, would count them twice if it did. So they are held, and the next flush first reads its
    writer's row (`usage_writers`): the flush set the row to its own number in its transaction, so
    the number is there exactly when the transaction committed. The read waits for a transaction
    still holding the row (its COMMIT still in flight, or its connection lost before the COMMIT
    reached the server and the server not yet aware: PostgreSQL ends it after FLUSH_IDLE_SECONDS
    idle). Committed: the counts are dropped; not: they are put back and written."""

    batch: _Buffers
    attempt: _Attempt

    def requests(self) -> int:
        return self.batch.requests()


async def _add_to_key(
    conn: BaseDBAsyncClient,
    key_id: str,
    total: int,
    successful: int,
    failed: int,
    last_used: datetime | None,
) -> None:
    """Add deltas to one key's lifetime counters through the ORM (SQLite)."""
    await (
        ApiKey.filter(public_id=key_id)
        .using_db(conn)
        .update(
            total_requests=F("total_requests") + total,
            successful_requests=F("successful_requests") + successful,
            failed_requests=F("failed_requests") + failed,
        )
    )
    if last_used is not None:
        await (
            ApiKey.filter(public_id=key_id)
            .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=last_used))
            .using_db(conn)
            .update(last_used_at=last_used)
        )


class UsageRecorder:
    """Aggregates verifications in memory and writes them in batches."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._buffers = _Buffers()
        self._minute: datetime | None = None
        self._per_ip: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._loop = Periodic(settings.flush_interval_seconds, self._tick, self._lock)
        # Due at the first tick (time.monotonic() counts from the host's boot).
        self._last_prune = -math.inf
        self._last_rollup = -math.inf
        # This process's bucket rows are its own (`usage_buckets.writer`): no other process
        # locks them.
        self.writer = secrets.randbelow(2**63 - 1) + 1
        # The current hour's `_Events`, from `_hour_start` (inclusive) to `_hour_end`. None:
        # found again at the next count.
        self._events: _Events | None = None
        self._hour_start = self._hour_end = _NEVER
        self._sequence = 0  # flushes begun (`usage_writers.flushed`)
        self._in_doubt: _InDoubt | None = None
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

    def _count(self, key: KeyRecord, now: datetime, valid: bool) -> None:
        """Count one verification of a known key: two appends and a dict store (`_Events`)."""
        events = self._events
        if events is None or not self._hour_start <= now < self._hour_end:
            events = self._events_at(now)
        pk = key.key_pk
        events.keys.append(pk if valid else -pk)
        events.moments.append(now)
        events.records[pk] = key
        if len(events.keys) > MAX_EVENTS:
            events.fold()

    def _events_at(self, now: datetime) -> _Events:
        """The `_Events` of `now`'s hour; remembers the current hour's."""
        hour = hour_of(now)
        events = self._buffers.events.get(hour)
        if events is None:
            events = self._buffers.events[hour] = _Events()
        if hour >= self._hour_start:  # not a moment from before the current hour
            self._events, self._hour_start, self._hour_end = events, hour, hour + ONE_HOUR
        return events

    # -- writing --------------------------------------------------------------------------
    @property
    def pending_requests(self) -> int:
        """Verifications of known keys counted in memory and not yet written."""
        held = self._in_doubt.requests() if self._in_doubt else 0
        return self._buffers.requests() + held

    def pending_counts(self) -> dict[tuple[str, datetime], _Counts]:
        """(key ID, hour) -> the counts not yet written (not those of a flush in doubt)."""
        return self._buffers.counts()

    @property
    def pending_denials(self) -> int:
        held = self._in_doubt.batch.denial_rows() if self._in_doubt else 0
        return self._buffers.denial_rows() + held

    async def flush(self) -> bool:
        """Write everything buffered. Returns False (keeping the deltas) when the database
        could not take it."""
        async with self._lock:
            if self._in_doubt is not None and not await self._settle(self._in_doubt):
                return False
            batch, self._buffers = self._buffers, _Buffers()
            self._events = None  # the next count finds its hour's in the new buffers
            if batch.empty():
                self.last_flush_monotonic = time.monotonic()
                return True
            self._sequence += 1
            attempt = _Attempt(self._sequence)
            try:
                await self._write(batch, attempt)
            except DATABASE_ERRORS as exc:
                self.flush_failures += 1
                logger.warning(
                    "usage flush failed (%s)%s; keeping %d requests and %d denials for the next",
                    type(exc).__name__,
                    " at its COMMIT" if attempt.committing else "",
                    batch.requests(),
                    batch.denial_rows(),
                )
                self._keep(batch, attempt)
                return False
            except Exception as exc:  # a bug, not an outage: say so loudly, and still lose nothing
                self.flush_failures += 1
                unforeseen(
                    logger, "usage flush crashed; keeping the batch for the next attempt", exc
                )
                self._keep(batch, attempt)
                return False
            self.flushes += 1
            self.last_flush_monotonic = time.monotonic()
            return True

    def _keep(self, batch: _Buffers, attempt: _Attempt) -> None:
        """A failed flush's counts: put back, or held when it failed at its COMMIT (`_InDoubt`)."""
        if attempt.committing:
            self._in_doubt = _InDoubt(batch, attempt)
        else:
            self._merge_back(batch)

    async def _settle(self, doubt: _InDoubt) -> bool:
        """Whether the flush in doubt committed: its counts dropped if it did, put back if not.
        False when that cannot be read yet (the counts stay held)."""
        try:
            async with transaction() as conn:
                if self.settings.is_postgres:
                    await conn.execute_script(
                        f"SET LOCAL lock_timeout = {int(IN_DOUBT_WAIT_SECONDS * 1000)}"
                    )
                    rows = await conn.execute_query_dict(_PG_LAST_FLUSHED, [self.writer])
                    flushed = int(rows[0]["flushed"])
                else:
                    row = await UsageWriter.filter(writer=self.writer).using_db(conn).first()
                    flushed = row.flushed if row is not None else 0
        except DATABASE_ERRORS as exc:
            self.flush_failures += 1
            logger.warning(
                "usage flush: whether the write whose COMMIT went unanswered committed cannot be "
                "read yet (%s); holding its %d requests",
                type(exc).__name__,
                doubt.requests(),
            )
            return False
        self._in_doubt = None
        if flushed == doubt.attempt.sequence:
            logger.info("usage flush: the write whose COMMIT went unanswered was committed")
        else:
            logger.info("usage flush: the write whose COMMIT went unanswered was not committed")
            self._merge_back(doubt.batch)
        return True

    def _merge_back(self, batch: _Buffers) -> None:
        current = self._buffers
        for hour, events in batch.events.items():
            kept = current.events.get(hour)
            if kept is None:
                current.events[hour] = events
            else:
                kept.put_back(events)
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

    async def _write(self, batch: _Buffers, attempt: _Attempt) -> None:
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
        async with transaction() as conn:
            await self._note_flush(conn, attempt.sequence)
            if self.settings.is_postgres:
                await self._write_events(conn, batch.events)
            else:
                await self._write_counts_orm(conn, batch.counts(), self.writer)
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
            attempt.committing = True  # from here on, the COMMIT

    async def _note_flush(self, conn: BaseDBAsyncClient, sequence: int) -> None:
        """Set this writer's row to this flush's number, in its transaction (`_InDoubt`)."""
        if self.settings.is_postgres:
            idle = FLUSH_IDLE_SECONDS + self.settings.flush_interval_seconds
            await conn.execute_script(
                _PG_FLUSHED.format(
                    idle_ms=int(idle * 1000), writer=int(self.writer), sequence=int(sequence)
                )
            )
            return
        now = self.clock.now()
        if (
            not await UsageWriter.filter(writer=self.writer)
            .using_db(conn)
            .update(flushed=sequence, at=now)
        ):
            await UsageWriter.create(writer=self.writer, flushed=sequence, at=now, using_db=conn)

    async def _write_events(self, conn: BaseDBAsyncClient, hours: dict[datetime, _Events]) -> None:
        """PostgreSQL: each hour's verifications, FLUSH_STATEMENT_ROWS rows to a statement with
        pauses between statements (`_Paced`)."""
        paced = _Paced(conn, self.settings.flush_interval_seconds / 2)
        for hour, events in hours.items():
            for columns in events.columns(hour):
                await paced.query(_PG_WRITE_KEYS, [*columns, _epoch(hour), self.writer])

    @staticmethod
    async def _write_counts_orm(
        conn: BaseDBAsyncClient, keys: dict[tuple[str, datetime], _Counts], writer: int
    ) -> None:
        """SQLite (one process): the same rules through the ORM. Key buckets are written as
        pending; a late write into a bucket the roll-up already closed also goes to the key's
        counters."""
        environments = _environments(keys)
        buckets = {**keys, **environments}
        if not buckets:
            return
        existing = {
            (b.key_id, b.bucket_start): b
            for b in await UsageBucket.filter(
                writer=writer,
                key_id__in={m[0] for m in buckets},
                bucket_start__in={m[1] for m in buckets},
            ).using_db(conn)
        }
        new: list[UsageBucket] = []
        late: list[tuple[str, _Counts]] = []
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
                        last_used_at=c.last_used,
                        rolled=(key_id, start) in environments,
                        writer=writer,
                    )
                )
                continue
            changes: dict[str, Any] = {
                "total_requests": F("total_requests") + c.total,
                "successful_requests": F("successful_requests") + c.successful,
                "failed_requests": F("failed_requests") + c.failed,
            }
            if c.last_used is not None and (
                row.last_used_at is None or c.last_used > row.last_used_at
            ):
                changes["last_used_at"] = c.last_used
            await UsageBucket.filter(id=row.id).using_db(conn).update(**changes)
            if row.rolled and (key_id, start) not in environments:
                late.append((key_id, c))
        if new:
            await UsageBucket.bulk_create(new, batch_size=1000, using_db=conn)
        for key_id, c in late:
            await _add_to_key(conn, key_id, c.total, c.successful, c.failed, c.last_used)

    async def rollup(self, now: datetime | None = None) -> int:
        """Add the key buckets of closed hours (before the current one) to their keys' lifetime
        counters and mark them; returns how many buckets were closed. Safe with several
        processes: each bucket is closed exactly once, and a flush racing it either lands
        before (and is closed with it) or sees it closed (and adds to the key itself)."""
        cutoff = hour_of(now or self.clock.now())
        closed = 0
        while True:
            async with transaction() as conn:
                if self.settings.is_postgres:
                    _, rows = await conn.execute_query(_PG_ROLLUP, [cutoff, ROLLUP_CHUNK])
                    count = int(rows[0][0])
                else:
                    count = await self._rollup_orm(conn, cutoff)
            closed += count
            if count < ROLLUP_CHUNK:
                return closed
            await asyncio.sleep(0)

    @staticmethod
    async def _rollup_orm(conn: BaseDBAsyncClient, cutoff: datetime) -> int:
        buckets = (
            await UsageBucket.filter(rolled=False, bucket_start__lt=cutoff)
            .limit(ROLLUP_CHUNK)
            .using_db(conn)
        )
        for b in buckets:
            await _add_to_key(
                conn,
                b.key_id,
                b.total_requests,
                b.successful_requests,
                b.failed_requests,
                b.last_used_at,
            )
        if buckets:
            await (
                UsageBucket.filter(id__in=[b.id for b in buckets])
                .using_db(conn)
                .update(rolled=True)
            )
        return len(buckets)

    async def prune(self, now: datetime | None = None) -> int:
        """Delete denial rows older than the retention age, and the rows of writers not heard
        of for WRITER_RETENTION; returns how many denial rows went."""
        now = now or self.clock.now()
        cutoff = now - timedelta(days=self.settings.denial_retention_days)
        deleted: int = await Denial.filter(at__lt=cutoff).delete()
        await UsageWriter.filter(at__lt=now - WRITER_RETENTION).delete()
        return deleted

    # -- the background task --------------------------------------------------------------
    async def _tick(self) -> None:
        await self.flush()
        if time.monotonic() - self._last_rollup >= ROLLUP_EVERY_SECONDS:
            self._last_rollup = time.monotonic()
            try:
                await self.rollup()
            except DATABASE_ERRORS as exc:  # nothing is lost: the buckets stay pending
                logger.warning("usage roll-up failed (%s); retrying later", type(exc).__name__)
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


@dataclass(frozen=True)
class KeyTotals:
    """A key's lifetime usage: its counters plus its buckets not yet rolled into them."""

    total: int = 0
    successful: int = 0
    failed: int = 0
    last_used_at: datetime | None = None


# One statement, so one snapshot: a roll-up that commits while it is read moves a bucket from
# the pending rows into the counters, and this sees it on one side only (two reads, one of the
# key's row and one of its buckets, could see it on neither).
_KEY_TOTALS = """
SELECT k.public_id AS key_id, k.last_used_at AS counted_latest,
       k.total_requests + COALESCE(SUM(b.total_requests), 0) AS total,
       k.successful_requests + COALESCE(SUM(b.successful_requests), 0) AS ok,
       k.failed_requests + COALESCE(SUM(b.failed_requests), 0) AS failed,
       MAX(b.last_used_at) AS latest
FROM api_keys k LEFT JOIN usage_buckets b ON b.key_id = k.public_id AND NOT b.rolled
WHERE k.public_id {match}
GROUP BY k.id, k.public_id, k.last_used_at, k.total_requests, k.successful_requests,
         k.failed_requests
"""


async def key_totals(key_ids: list[str]) -> dict[str, KeyTotals]:
    """Per key ID that names a key: its lifetime usage, read in one statement."""
    if not key_ids:
        return {}
    connection = connections.get("default")
    match, values = any_of(connection, key_ids)
    return {
        str(r["key_id"]): KeyTotals(
            int(r["total"]),
            int(r["ok"]),
            int(r["failed"]),
            latest(r["counted_latest"], r["latest"]),
        )
        for r in await connection.execute_query_dict(_KEY_TOTALS.format(match=match), values)
    }
