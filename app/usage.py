"""Usage counters and the denial log, without a database write per request.

`/v1/verify` calls `record` (O(1), no I/O); a background task calls `flush` every flush interval
and once more on shutdown. A key's counts go on the tally its cached record carries
(`app.verifier.UsageTally`: no lookup and no new object per request), and the recorder lists the
tallies it has to write; counts that cannot go on a tally (the hour turned while it held counts,
a failed flush's rows put back) are kept by (key, hour) in `_Buffers`. A flush writes, in one
transaction:

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
per hour. On PostgreSQL a key's tally remembers the row ID of its pending bucket of the current
hour and the flush updates it by ID (a third less PostgreSQL work than the upsert); a row gone
meanwhile is found missing and upserted again. PostgreSQL sums the environments' buckets from
the key rows in the same statements. The PostgreSQL roll-up merges a closed hour's rows into one
(writer MERGED_WRITER) rather than marking them; on SQLite it marks them rolled in place.

Counting rules (CONTRACT §4): a VALID verification adds a successful request and sets
`lastUsedAt`; a refusal that names a known key adds a failed request. Every refusal is a denial.

Flood folding: each client IP gets `denial_rate_per_ip` denial rows per minute (per process);
further refusals from that IP in the same minute are folded into one row per (IP, code, key) and
flush whose `count` says how many there were. Buffers are bounded: beyond MAX_DENIAL_ROWS
pending rows, refusals are folded into one row per code with IP `(many)`; so memory and the
table stay bounded under a flood of random tokens, and every refusal is still counted.

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
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from tortoise import connections
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.expressions import F, Q

from app.background import Periodic
from app.clock import Clock
from app.db import DATABASE_ERRORS, UNREACHABLE_ERRORS, any_of, latest, transaction
from app.log_policy import unforeseen
from app.settings import Settings
from app.verifier import KeyRecord
from models import ApiKey, Denial, UsageBucket, UsageWriter, Workspace

logger = logging.getLogger("keyplane.usage")

MAX_DENIAL_ROWS = 50_000  # pending denial rows kept in memory between flushes
MAX_TRACKED_IPS = 100_000  # per-minute rate counters; beyond this every IP is over its rate
MANY_IPS = "(many)"
ONE_HOUR = timedelta(hours=1)
PRUNE_EVERY_SECONDS = 600.0
MESSAGE_LIMIT = 200
ORIGIN_LIMIT = 300


# The flush encodes its rows for PostgreSQL FLUSH_SLICE at a time, pausing FLUSH_SLICE_PAUSE
# seconds between slices: encoding ~10,000 rows is tens of milliseconds of Python, and done in one
# go (or in slices with only a bare yield between them) the requests in flight wait it out.
FLUSH_SLICE = 250
FLUSH_SLICE_PAUSE = 0.001
# It sends them about FLUSH_STATEMENT_ROWS to a statement (whole slices) and, before each statement
# after its first, pauses FLUSH_PAUSE_FACTOR times as long as the one before took, at most half
# the flush interval in all: PostgreSQL's part of a flush is spread over about four times its
# length instead of one burst that takes a whole core (about 100 ms for 15,000 rows). On the
# two-core bench machine such a burst also took CPU from the server under load.
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

# A flush that fails this many times in a row for a reason other than a database it cannot
# reach (or a deadlock or lock wait, which pass) sets its denial records aside: one record no
# database can take (a bug) must not stop every later count being written. Counts are never
# set aside.
SET_ASIDE_AFTER_CRASHES = 3
_PASSING_ERRORS: tuple[type[BaseException], ...] = (
    *UNREACHABLE_ERRORS,
    asyncpg.TransactionRollbackError,  # deadlock, serialization failure
    asyncpg.LockNotAvailableError,
)

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
# The flush passes each column as one comma-separated text (numbers, public IDs, the hour as
# integer epoch microseconds and the last use as microseconds after it), split by PostgreSQL:
# asyncpg encoding Python lists element by element cost the event loop about 4.5 ms per 1,000
# rows, this under 1 ms (in slices, above). Successful requests are not sent: every request is
# either successful or failed, so they are the total less the failed.
_BUCKET_ROWS = """SELECT ws, env, key_id, TIMESTAMPTZ 'epoch' + hour_us * INTERVAL '1 microsecond'
           AS hour, total, total - failed AS ok, failed,
           TIMESTAMPTZ 'epoch' + (hour_us + last_off) * INTERVAL '1 microsecond' AS last_used
    FROM unnest(string_to_array($1, ',')::int[], string_to_array($2, ',')::int[],
                string_to_array($3, ',')::varchar[], string_to_array($4, ',')::bigint[],
                string_to_array($5, ',')::bigint[], string_to_array($6, ',')::bigint[],
                string_to_array($7, ',', '')::bigint[])
        AS v(ws, env, key_id, hour_us, total, failed, last_off)"""


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


# Every bucket row belongs to one writer (a process: $9 and $5 below), so no two processes
# ever lock the same row and the statements need no lock order.
# Key buckets: upserted as pending. Returns their row IDs for hour $8, for the next flush to
# update by ID. On PostgreSQL a writer's rows are always pending: the roll-up does not mark them,
# it merges them into a MERGED_WRITER row and deletes them, so a late write for a closed hour
# lands in a new pending row of its own, for the next roll-up.
_PG_WRITE_KEYS = f"""WITH v AS ({_BUCKET_ROWS}
), up AS (
    {_BUCKET_INSERT}
    SELECT ws, env, key_id, hour, total, ok, failed, last_used, FALSE, $9::bigint FROM v
    {_BUCKET_UPSERT}
    RETURNING b.id, b.key_id, b.bucket_start
), {_add_environments_sql("v", "$9")}
SELECT array_agg(id) AS ids, array_agg(key_id) AS key_ids FROM up
    WHERE bucket_start = TIMESTAMPTZ 'epoch' + $8::bigint * INTERVAL '1 microsecond'"""
# Key buckets this process holds the row ID of (its pending buckets of the current hour): updated
# by ID, a third less work for PostgreSQL than the upsert. Returns the IDs it did not find (the
# roll-up merged the row meanwhile, or it was deleted); the flush upserts those instead, and
# their environments are counted there. The rows are looked up by ID in ID order: run after
# _PG_BY_ID_PLAN, which keeps the planner from scanning the whole primary key to merge-join a
# fifth of it (measured on 20,000 of 100,000 rows: 127 ms instead of 209 ms of PostgreSQL time).
_PG_UPDATE_KEYS = f"""WITH v AS (
    SELECT id, total, total - failed AS ok, failed, last_off
    FROM unnest(string_to_array($1, ',')::bigint[], string_to_array($2, ',')::bigint[],
                string_to_array($3, ',')::bigint[], string_to_array($4, ',', '')::bigint[])
        AS v(id, total, failed, last_off)
    ORDER BY id
), up AS (
    UPDATE usage_buckets AS b SET
        total_requests = b.total_requests + v.total,
        successful_requests = b.successful_requests + v.ok,
        failed_requests = b.failed_requests + v.failed,
        last_used_at = GREATEST(b.last_used_at,
                                b.bucket_start + v.last_off * INTERVAL '1 microsecond')
    FROM v WHERE b.id = v.id
    RETURNING b.id, b.workspace_id AS ws, b.environment_id AS env, b.bucket_start AS hour,
              v.total, v.ok, v.failed,
              b.bucket_start + v.last_off * INTERVAL '1 microsecond' AS last_used
), {_add_environments_sql("up", "$5")}
SELECT array_agg(id) AS missed FROM v WHERE id NOT IN (SELECT id FROM up)"""
# For the rest of the flush's transaction (whose other statements join nothing large).
_PG_BY_ID_PLAN = "SET LOCAL enable_mergejoin = off; SET LOCAL enable_hashjoin = off"
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


def _ints(values: list[int]) -> str:
    """Integers, comma-separated: one %-format over the whole list, about 40 ns a value against
    75 for `",".join(map(str, values))` (the flush's hot columns, one row per key verified)."""
    return ("%d," * len(values) % tuple(values))[:-1]


def _epoch(moment: datetime) -> int:
    """Epoch microseconds, as the flush statements read timestamps back."""
    return round(moment.timestamp() * 1_000_000)


def _epochs(moments: Iterable[datetime | None]) -> str:
    """Epoch microseconds, comma-separated; an empty field for None (read back as NULL).
    Integers: formatting a float's repr took twice as long."""
    seen: dict[datetime, str] = {}
    out: list[str] = []
    for moment in moments:
        if moment is None:
            out.append("")
            continue
        text = seen.get(moment)
        if text is None:
            text = seen[moment] = str(_epoch(moment))
        out.append(text)
    return ",".join(out)


def _bucket_columns(rows: list[tuple[tuple[str, datetime], _Counts]]) -> list[str]:
    """The bucket columns, one text each, as the flush statements split them."""
    return [
        _ints([c.workspace_pk for _, c in rows]),
        _ints([c.environment_pk for _, c in rows]),
        ",".join(marker[0] for marker, _ in rows),
        _epochs(marker[1] for marker, _ in rows),
        _ints([c.total for _, c in rows]),
        _ints([c.failed for _, c in rows]),
        ",".join(_offsets([c.last_used], marker[1]) for marker, c in rows),
    ]


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
    # (key ID, hour) -> that key's counts in that hour, for the counts that are not on a key's
    # tally: an hour that turned, another recorder's record, a failed flush's rows put back.
    # (A flush derives the environments' buckets from these and the tallies.)
    keys: dict[tuple[str, datetime], _Counts] = field(default_factory=dict)
    denials: list[_Denial] = field(default_factory=list)
    folded: dict[tuple[str, str, str | None, datetime], _Denial] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.keys or self.denials or self.folded)

    def requests(self) -> int:
        return sum(c.total for c in self.keys.values())

    def denial_rows(self) -> int:
        return len(self.denials) + len(self.folded)

    def environments(self) -> dict[tuple[str, datetime], _Counts]:
        """Per (environment public ID, hour): the sum of its keys' counts."""
        out: dict[tuple[str, datetime], _Counts] = {}
        _add_environments(out, self.keys.items())
        return out


def _passes(exc: BaseException) -> bool:
    """Whether a failure, or one it was raised from, says the database cannot be reached now
    or a lock was in the way: nothing about the batch itself."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, _PASSING_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _storable(text: str, limit: int) -> str:
    """Text any database column takes: at most `limit` characters, valid UTF-8 (half a
    surrogate pair, which no encoder accepts, is written as its escape) and no NUL (which
    PostgreSQL text cannot hold)."""
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    return text[:limit]


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


def _put(
    counts: dict[tuple[str, datetime], _Counts], marker: tuple[str, datetime], more: _Counts
) -> None:
    """Add `more` to the counts under `marker`."""
    existing = counts.get(marker)
    if existing is None:
        counts[marker] = more
    else:
        existing.add(more)


def _offsets(moments: Iterable[datetime | None], hour: datetime) -> str:
    """Microseconds from `hour` to each moment (a last use in that hour), comma-separated; an
    empty field for None. A subtraction: a third of the cost of an epoch timestamp."""
    return ",".join(
        [
            ""
            if m is None
            else str(((d := m - hour).days * 86_400 + d.seconds) * 1_000_000 + d.microseconds)
            for m in moments
        ]
    )


def _concatenated(slices: list[list[str]]) -> list[str] | None:
    """Per-slice column texts joined into one text per column; None for no rows."""
    return [",".join(column) for column in zip(*slices, strict=True)] if slices else None


class _Rows:
    """Key rows of one hour that a PostgreSQL flush took from tallies, for one statement, column
    by column: the values (to learn bucket row IDs after the commit, to send again, or to put
    back when the write fails) and their text, encoded a slice at a time."""

    def __init__(self, by_id: bool) -> None:
        self.by_id = by_id  # `_PG_UPDATE_KEYS` (the tally knows the bucket row) or upserted
        self.keys: list[KeyRecord] = []
        self.bucket_ids: list[int] = []  # by_id only
        self.totals: list[int] = []
        self.failures: list[int] = []
        self.last_used: list[datetime | None] = []
        self._texts: list[list[str]] = []  # per slice encoded: one text per column
        self._sizes: list[int] = []  # rows per slice
        self._encoded = 0

    def encode(self, hour: datetime) -> None:
        """Encode the rows appended since the last call."""
        start = self._encoded
        keys = self.keys[start:]
        if not keys:
            return
        self._encoded = len(self.keys)
        self._sizes.append(len(keys))
        if self.by_id:
            head = [_ints(self.bucket_ids[start:])]
        else:
            head = [
                _ints([key.workspace_pk for key in keys]),
                _ints([key.environment_pk for key in keys]),
                ",".join([key.key_id for key in keys]),
                ",".join([str(_epoch(hour))] * len(keys)),
            ]
        self._texts.append(
            [
                *head,
                _ints(self.totals[start:]),
                _ints(self.failures[start:]),
                _offsets(self.last_used[start:], hour),
            ]
        )

    def statements(self) -> list[list[str]]:
        """The encoded columns, whole slices of about FLUSH_STATEMENT_ROWS rows per statement."""
        groups: list[list[list[str]]] = [[]]
        rows = 0
        for texts, size in zip(self._texts, self._sizes, strict=True):
            if rows >= FLUSH_STATEMENT_ROWS:
                groups.append([])
                rows = 0
            groups[-1].append(texts)
            rows += size
        return [columns for group in groups if (columns := _concatenated(group)) is not None]

    def counts(self, index: int) -> _Counts:
        return _key_counts(
            self.keys[index], self.totals[index], self.failures[index], self.last_used[index]
        )

    def taking(self, rows: _Rows, indexes: Iterable[int]) -> None:
        """Append these rows of `rows`."""
        for index in indexes:
            self.keys.append(rows.keys[index])
            self.totals.append(rows.totals[index])
            self.failures.append(rows.failures[index])
            self.last_used.append(rows.last_used[index])
            if self.by_id:
                self.bucket_ids.append(rows.bucket_ids[index])

    def unique(self, others: dict[tuple[str, datetime], _Counts], hour: datetime) -> _Rows:
        """These rows with one row per key (one statement must not name a bucket twice): a
        second record of a key (the cache reloaded it while the old one held counts) goes to
        `others`."""
        ids = self.bucket_ids if self.by_id else [key.key_id for key in self.keys]
        if len(set(ids)) == len(ids):
            return self
        seen: set[str] = set()
        kept = _Rows(self.by_id)
        for index, key in enumerate(self.keys):
            if key.key_id in seen:
                _put(others, (key.key_id, hour), self.counts(index))
            else:
                seen.add(key.key_id)
                kept.taking(self, (index,))
        kept.encode(hour)
        return kept


def _key_counts(key: KeyRecord, total: int, failed: int, last: datetime | None) -> _Counts:
    """A key's counts (every request is successful or failed)."""
    ws, env, env_id = key.workspace_pk, key.environment_pk, key.environment_id
    return _Counts(ws, env, env_id, total, total - failed, failed, last)


def _add_tallies(out: dict[tuple[str, datetime], _Counts], keys: Iterable[KeyRecord]) -> None:
    """Add the counts pending on these keys' tallies to `out`, by (key ID, hour)."""
    for key in keys:
        tally = key.tally
        if tally.total and tally.hour is not None:
            _put(
                out,
                (key.key_id, tally.hour),
                _key_counts(key, tally.total, tally.failed, tally.last_used),
            )


def _drain(dirty: list[KeyRecord], batch: _Buffers) -> None:
    """Move the counts of these tallies into `batch` (SQLite: one process, small batches)."""
    _add_tallies(batch.keys, dirty)
    for key in dirty:
        tally = key.tally
        tally.total = tally.failed = 0
        tally.last_used = None


async def _encoded_buckets(rows: list[tuple[tuple[str, datetime], _Counts]]) -> list[str] | None:
    """`_bucket_columns`, FLUSH_SLICE rows at a time with a pause between slices."""
    slices: list[list[str]] = []
    for start in range(0, len(rows), FLUSH_SLICE):
        if start:
            await asyncio.sleep(FLUSH_SLICE_PAUSE)
        slices.append(_bucket_columns(rows[start : start + FLUSH_SLICE]))
    return _concatenated(slices)


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


class _Taken:
    """One flush: its number, whether its transaction got as far as its COMMIT, and (PostgreSQL)
    what it took from the tallies: this hour's rows, by statement."""

    def __init__(self, hour: datetime, sequence: int) -> None:
        self.hour = hour
        self.sequence = sequence
        self.committing = False
        self.known = _Rows(by_id=True)
        self.new = _Rows(by_id=False)
        self.again = _Rows(by_id=False)  # known rows whose bucket row was gone: upserted

    def requests(self) -> int:
        return sum(self.known.totals) + sum(self.new.totals)


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
    taken: _Taken

    def requests(self) -> int:
        return self.batch.requests() + self.taken.requests()


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
        self._hour_start: datetime | None = None
        self._per_ip: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._loop = Periodic(settings.flush_interval_seconds, self._tick, self._lock)
        # Due at the first tick (time.monotonic() counts from the host's boot).
        self._last_prune = -math.inf
        self._last_rollup = -math.inf
        # This process's bucket rows are its own (`usage_buckets.writer`): no other process
        # locks them. On PostgreSQL a key's tally keeps the row ID of its pending bucket of the
        # current hour: the next flush updates by ID.
        self.writer = secrets.randbelow(2**63 - 1) + 1
        # The records whose tallies hold counts not yet written (each once).
        self._dirty: list[KeyRecord] = []
        self._sequence = 0  # flushes begun (`usage_writers.flushed`)
        self._in_doubt: _InDoubt | None = None
        # For /metrics.
        self.last_flush_monotonic = time.monotonic()
        self.flushes = 0
        self.flush_failures = 0
        self.recorded = 0
        self.crashes_in_a_row = 0
        self.denials_set_aside = 0

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
        """Count into the key's tally: no lookup, and no new object once it is listed."""
        tally = key.tally
        hour = self._hour(now)
        if tally.owner is not self:
            if tally.owner is not None:  # another recorder's (tests run several)
                self._count_in_buffers(key, hour, now, valid)
                return
            tally.owner = self
        if not tally.total:
            tally.hour = hour
            self._dirty.append(key)
        elif tally.hour is not hour and tally.hour != hour:  # the hour turned: rare
            self._count_in_buffers(key, hour, now, valid)
            return
        tally.total += 1
        if valid:
            if tally.last_used is None or now > tally.last_used:
                tally.last_used = now
        else:
            tally.failed += 1

    def _count_in_buffers(self, key: KeyRecord, hour: datetime, now: datetime, valid: bool) -> None:
        marker = (key.key_id, hour)
        counts = self._buffers.keys.get(marker)
        if counts is None:
            counts = self._buffers.keys[marker] = _Counts(
                key.workspace_pk, key.environment_pk, key.environment_id
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
        held = self._in_doubt.requests() if self._in_doubt else 0
        return self._buffers.requests() + sum(key.tally.total for key in self._dirty) + held

    def pending_counts(self) -> dict[tuple[str, datetime], _Counts]:
        """(key ID, hour) -> the counts not yet written (a copy)."""
        out: dict[tuple[str, datetime], _Counts] = {}
        _add_tallies(out, self._dirty)
        for marker, counts in self._buffers.keys.items():
            _put(out, marker, dataclasses.replace(counts))
        return out

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
            dirty, self._dirty = self._dirty, []
            if batch.empty() and not dirty:
                self.last_flush_monotonic = time.monotonic()
                return True
            self._sequence += 1
            taken = _Taken(self._hour(self.clock.now()), self._sequence)
            try:
                await self._write(batch, dirty, taken)
            except DATABASE_ERRORS as exc:
                self.flush_failures += 1
                logger.warning(
                    "usage flush failed (%s)%s; keeping %d requests and %d denials for the next",
                    type(exc).__name__,
                    " at its COMMIT" if taken.committing else "",
                    batch.requests() + taken.requests(),
                    batch.denial_rows(),
                )
                self._after_failure(exc, batch, taken)
                return False
            except Exception as exc:  # a bug, not an outage: say so loudly, and still lose nothing
                self.flush_failures += 1
                unforeseen(
                    logger, "usage flush crashed; keeping the batch for the next attempt", exc
                )
                self._after_failure(exc, batch, taken)
                return False
            self.crashes_in_a_row = 0
            self.flushes += 1
            self.last_flush_monotonic = time.monotonic()
            return True

    def _after_failure(self, exc: BaseException, batch: _Buffers, taken: _Taken) -> None:
        """Keep a failed flush's batch; after repeated failures that an unreachable database
        does not explain, without its denial records."""
        if _passes(exc):
            self.crashes_in_a_row = 0
        else:
            self.crashes_in_a_row += 1
            if self.crashes_in_a_row >= SET_ASIDE_AFTER_CRASHES and not taken.committing:
                self._set_aside_denials(batch)
        self._keep(batch, taken)

    def _set_aside_denials(self, batch: _Buffers) -> None:
        """Drop a crashing batch's denial records (each refusal stays in the verifications'
        counts and metrics): the one thing a flush may lose, and only after repeated crashes."""
        rows = batch.denial_rows()
        if not rows:
            return
        self.denials_set_aside += rows
        logger.error(
            "usage flush crashed %d times in a row; setting aside its %d denial records so "
            "the counts are written",
            self.crashes_in_a_row,
            rows,
        )
        batch.denials.clear()
        batch.folded.clear()

    def _keep(self, batch: _Buffers, taken: _Taken) -> None:
        """A failed flush's counts: put back, or held when it failed at its COMMIT (`_InDoubt`)."""
        if taken.committing:
            self._in_doubt = _InDoubt(batch, taken)
        else:
            self._merge_back(batch, taken)

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
        if flushed == doubt.taken.sequence:
            logger.info("usage flush: the write whose COMMIT went unanswered was committed")
        else:
            logger.info("usage flush: the write whose COMMIT went unanswered was not committed")
            self._merge_back(doubt.batch, doubt.taken)
        return True

    def _merge_back(self, batch: _Buffers, taken: _Taken) -> None:
        current = self._buffers
        for marker, counts in batch.keys.items():
            if marker in current.keys:
                counts.add(current.keys[marker])
            current.keys[marker] = counts
        for rows in (taken.known, taken.new):  # (`again` repeats rows of `known`)
            for index, key in enumerate(rows.keys):
                _put(current.keys, (key.key_id, taken.hour), rows.counts(index))
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

    async def _write(self, batch: _Buffers, dirty: list[KeyRecord], taken: _Taken) -> None:
        # The tallies are taken first, before any statement can fail: a failed flush puts back
        # what it took (`_merge_back`), but a key whose tally it never read would be on no
        # list any more, and its counts (and every later one) never written.
        postgres = self.settings.is_postgres
        if postgres:  # encoded before taking a connection
            await self._take(dirty, batch, taken)
            # The counts not taken from tallies (an hour that turned, rows put back).
            others = await _encoded_buckets(list(batch.keys.items()))
        else:
            _drain(dirty, batch)
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
        learned: dict[str, int] = {}
        async with transaction() as conn:
            await self._note_flush(conn, taken.sequence)
            if not postgres:
                await self._write_counts_orm(conn, batch, self.writer)
            else:
                paced = _Paced(conn, self.settings.flush_interval_seconds / 2)
                await self._write_taken(paced, taken, learned)
                if others is not None:
                    await paced.query(_PG_WRITE_KEYS, [*others, _epoch(taken.hour), self.writer])
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
                            ip=_storable(d.ip, 45),
                            origin=_storable(d.origin, ORIGIN_LIMIT) if d.origin else None,
                            code=d.code,
                            message=_storable(d.message, MESSAGE_LIMIT),
                            count=d.count,
                        )
                        for d in denials
                    ],
                    batch_size=1000,
                    using_db=conn,
                )
            taken.committing = True  # from here on, the COMMIT
        # Committed: the tallies of the upserted keys remember their bucket's row ID.
        for rows in (taken.new, taken.again):
            for key in rows.keys:
                tally = key.tally
                tally.bucket_id, tally.bucket_hour = learned.get(key.key_id), taken.hour

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

    async def _take(self, dirty: list[KeyRecord], batch: _Buffers, taken: _Taken) -> None:
        """Take the counts of the tallies in `dirty` into `taken` (PostgreSQL), encoding them
        FLUSH_SLICE at a time with a pause between slices. Counts of an earlier hour go to
        `batch` instead."""
        hour, known, new = taken.hour, taken.known, taken.new
        known_key, known_id, known_total, known_failed, known_last = (
            known.keys.append,
            known.bucket_ids.append,
            known.totals.append,
            known.failures.append,
            known.last_used.append,
        )
        new_key, new_total, new_failed, new_last = (
            new.keys.append,
            new.totals.append,
            new.failures.append,
            new.last_used.append,
        )
        done = 0
        try:
            for start in range(0, len(dirty), FLUSH_SLICE):
                if start:
                    await asyncio.sleep(FLUSH_SLICE_PAUSE)
                for key in dirty[start : start + FLUSH_SLICE]:
                    tally = key.tally
                    total = tally.total
                    if not total:
                        continue
                    failed, last = tally.failed, tally.last_used
                    tally.total = tally.failed = 0
                    tally.last_used = None
                    if tally.hour is not hour and tally.hour != hour:
                        marker = (key.key_id, tally.hour or hour)
                        _put(batch.keys, marker, _key_counts(key, total, failed, last))
                        continue
                    bucket = tally.bucket_id
                    if bucket is not None and (
                        tally.bucket_hour is hour or tally.bucket_hour == hour
                    ):
                        known_key(key)
                        known_id(bucket)
                        known_total(total)
                        known_failed(failed)
                        known_last(last)
                    else:
                        new_key(key)
                        new_total(total)
                        new_failed(failed)
                        new_last(last)
                done = start + FLUSH_SLICE
                known.encode(hour)
                new.encode(hour)
        finally:
            if done < len(dirty):  # interrupted: what is left is counted by the next flush
                self._dirty.extend(dirty[done:])
        taken.known = known.unique(batch.keys, hour)
        taken.new = new.unique(batch.keys, hour)

    async def _write_taken(self, paced: _Paced, taken: _Taken, learned: dict[str, int]) -> None:
        """The key rows taken from tallies: updated by bucket row ID where it is known, else
        upserted (and the row IDs of the hour's buckets go into `learned`, by key ID)."""
        known, again = taken.known, taken.again
        statements = known.statements()
        if statements:
            await paced.conn.execute_script(_PG_BY_ID_PLAN)
        gone: set[int] = set()
        for columns in statements:
            result = await paced.query(_PG_UPDATE_KEYS, [*columns, self.writer])
            gone.update(result[0]["missed"] or ())
        if gone:  # rolled up or deleted meanwhile: upsert those rows
            again.taking(known, [i for i, b in enumerate(known.bucket_ids) if b in gone])
            again.encode(taken.hour)
        # `new` and `again` in statements of their own: a key reloaded into the cache can be in
        # both (its old record's row gone, its new record's tally without one), and one upsert
        # must not name a bucket twice.
        for rows in (taken.new, again):
            for columns in rows.statements():
                result = await paced.query(
                    _PG_WRITE_KEYS, [*columns, _epoch(taken.hour), self.writer]
                )
                if result[0]["ids"]:
                    learned.update(zip(result[0]["key_ids"], result[0]["ids"], strict=True))

    @staticmethod
    async def _write_counts_orm(conn: BaseDBAsyncClient, batch: _Buffers, writer: int) -> None:
        """SQLite (one process): the same rules through the ORM. Key buckets are written as
        pending; a late write into a bucket the roll-up already closed also goes to the key's
        counters."""
        environments = batch.environments()
        buckets = {**batch.keys, **environments}
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
