"""The verification key cache: a bounded LRU of secret hash → KeyRecord.

A fill reads the key by the unique `api_keys.secret_hash` index (joined with environment, role
and workspace); the misses of one event-loop turn share one query (`MAX_BATCH` hashes at most)
and their records are built together. Unknown tokens are cached briefly as negatives so a flood
of bad tokens cannot hammer the database. Every management change reports the affected hashes
through the ChangeFeed, and the entries are dropped before the mutation returns (other processes
hear it through app.invalidation).

Safety net: every `cache_refresh_seconds` a background task re-reads every cached key in bulk
(REFRESH_CHUNK per query; on PostgreSQL the database compares each row's fingerprint, looked up by
row ID, with the cached one and names the rows that moved; then whole rows for those only; no ORM
objects), replaces the records that changed and drops the keys that are gone; a positive entry
stays fresh for two refresh periods after it was last confirmed, so a hot key is never reloaded on
the request path and a lost notification lives at most one refresh period. What the refresh sends
is kept in flat arrays beside the entries (`_Slots`), and it confirms the keys a chunk at a time,
so an unchanged key's entry is not touched by it at all. When the database
cannot be reached, an entry confirmed less than `max_staleness_seconds` ago is still served;
otherwise the caller gets Unavailable.

Fault handling (tests/test_faults.py): every way the database can fail (`app.db.DATABASE_ERRORS`,
including asyncpg's untranslated connection errors during a PostgreSQL restart) means
Unavailable, never an HTTP 500; the staleness is measured when the lookup fails, not when it
started (a slow failing connect must not stretch the bound); and the shared in-flight lookup is
always resolved, so concurrent waiters for the same key never hang when the loader dies. A
frozen database (SIGSTOP, a network blackhole) refuses nothing and answers nothing: a lookup is
waited for at most LOOKUP_TIMEOUT_SECONDS, then treated as a database error (stale entry or
Unavailable). The query is not cancelled (cancelling an asyncpg query waits on the frozen server
too); it lands in the background, at most MAX_STUCK_LOOKUPS of them at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from tortoise import connections

from app.background import Periodic
from app.db import DATABASE_ERRORS, any_of, as_utc
from app.net import compile_allowlist
from app.settings import Settings
from app.verifier import KeyRecord
from models import ApiKey, KeyKind

logger = logging.getLogger("keyplane.cache")

# Cached keys per refresh query. A round trip costs the event loop ~0.7 ms whatever its size, and
# the refresh sends the chunk's row IDs and fingerprints from `_Slots` as they are (no Python code
# per key), so a chunk can be large: PostgreSQL takes ~60 ms for 4,000.
REFRESH_CHUNK = 4000
REFRESH_JITTER = 0.1  # each refresh period is 0.9 to 1.1 times cache_refresh_seconds
# Recency is kept by rounds: a hit moves its entry to the young end of the eviction order at most
# once per round, and a round ends after every cache_size // RECENCY_ROUNDS fills. Moving an entry
# of a 100,000-entry OrderedDict costs about 0.9 us of cache misses, on every hit; a full cache
# that only hits (the hot set fits) now moves nothing, and an entry in use is never more than a
# round from the young end when a fill evicts the oldest. Small caches are exactly LRU.
RECENCY_ROUNDS = 8
# Entries share the float objects of their fresh_until times: the fills of one such window share
# one (`KeyCache._store`), the keys a refresh confirms in one chunk another (`_Slots`). A float
# of its own per entry was one more object for a hit to read from memory, about 0.3 us of cache
# misses a verification with 100,000 keys in use (in process: `make bench-timed`).
FILL_UNTIL_SHARED = 0.5  # seconds
LOOKUP_TIMEOUT_SECONDS = 2.0  # a request-path lookup; a healthy one takes milliseconds
MAX_STUCK_LOOKUPS = 1000  # timed-out lookups still running; beyond this, fail at once
# Misses of one event-loop turn are read by one query, at most MAX_BATCH hashes each (SQLite builds
# may bind no more than 999 parameters). With 32 concurrent callers this filled 100,000 keys of
# 1,000,000 in 39 s instead of 89 s. The records of a batch are built in one go, so the cache's
# long-lived objects sit together instead of between the blocks of requests in flight: with the
# fills of the warm-up batched (about 14 a query), the server that then answered for those
# 100,000 keys did 1.029 times the verifications (8 rounds, 1.008-1.041) of one filled key by key.
MAX_BATCH = 500
# One joined read per batch of hashes, in plain SQL: no ORM objects, no query building per call.
_COLUMNS = (
    ("k.id", "id"),
    ("k.public_id", "public_id"),
    ("k.type", "type"),
    ("k.workspace_id", "workspace_id"),
    ("w.public_id", "ws"),
    ("k.environment_id", "environment_id"),
    ("e.public_id", "env"),
    ("k.status", "status"),
    ("k.permissions", "permissions"),
    ("r.permissions", "role"),
    ("k.allowed_ips", "allowed_ips"),
    ("e.authorized_origins", "authorized_origins"),
    ("k.expires_at", "expires_at"),
    ("k.grace_ends_at", "grace_ends_at"),
)
_FROM = """
FROM api_keys k
JOIN workspaces w ON w.id = k.workspace_id
JOIN environments e ON e.id = k.environment_id
LEFT JOIN roles r ON r.id = k.role_id
WHERE """
_SELECTED = "SELECT k.secret_hash, " + ", ".join(f"{expr} AS {name}" for expr, name in _COLUMNS)
_SELECT = _SELECTED + _FROM
# PostgreSQL computes each row's fingerprint itself (the secret hash included), so the
# safety-net refresh looks rows up by row ID (half the PostgreSQL time of a lookup by secret hash:
# measured 0.7 s instead of 1.4 s per 100,000 keys of 1,000,000) and rebuilds only the records
# whose fingerprint moved.
_PG_FINGERPRINT = (
    "hashtextextended(ROW(k.secret_hash, " + ", ".join(expr for expr, _ in _COLUMNS) + ")::text, 0)"
)
_PG_SELECT = f"{_SELECTED}, {_PG_FINGERPRINT} AS fp{_FROM}"
# The refresh sends each cached key's row ID and the fingerprint of the row its record was built
# from (`_Slots`; a free slot has row ID 0) as two byte strings of big-endian int8s, copied from
# the arrays in C (65 us per 4,000 keys; asyncpg encoding an int8[] checks each element's type in
# Python, 0.12 s per 100,000 keys, and `str()` of 64-bit ints costs about as much). PostgreSQL
# decodes them (~1.3 us a key) and answers with the positions of the rows that moved (changed,
# deleted, or no longer joined), usually none: the event loop decodes no row per unchanged key.
# Each row is looked up by ID from its position (LATERAL): written as a join with `id IN (...)`,
# the generic plan PostgreSQL settles on for a prepared statement rescanned the whole list for
# every row (1 s per 4,000 keys instead of 60 ms).
_PG_INT8_AT = "('x' || encode(substring({} FROM n * 8 + 1 FOR 8), 'hex'))::bit(64)::int8"
_PG_MOVED = f"""SELECT v.n
    FROM (SELECT n, {_PG_INT8_AT.format("$1::bytea")} AS id, {_PG_INT8_AT.format("$2::bytea")} AS fp
          FROM generate_series(0, length($1::bytea) / 8 - 1) AS n) AS v
    LEFT JOIN LATERAL (SELECT {_PG_FINGERPRINT} AS fp {_FROM}k.id = v.id) AS f ON true
    WHERE v.id <> 0 AND f.fp IS DISTINCT FROM v.fp"""


class Unavailable(Exception):
    """The key's state cannot be known: the database is unreachable and nothing usable is cached."""


@dataclass(slots=True)
class CacheEntry:
    record: KeyRecord | None  # None: a negative entry (unknown token)
    fresh_until: float  # until then it needs no check (or its slot's confirmation, `_Slots`)
    body: bytes | None = None  # the rendered VALID answer, kept by the verify endpoint
    round: int = 0  # the recency round it was last moved to the young end in (KeyCache)
    slot: int = -1  # a key's place in `_Slots` (-1: a negative entry, or no longer cached)


class _Slots:
    """What the refresh needs of the cached keys, in flat arrays beside their entries: slot i
    holds a key's row ID, the fingerprint of the row its record was built from, and its secret
    hash (row ID 0 and None: a free slot). A refresh sends a chunk's two arrays as they are and
    confirms the chunk as a whole (`confirm`), so it reads no entry and writes none unless its
    row moved; an entry past its own fresh_until is fresh while its slot's confirmation lasts
    (`confirmed_until`). With 100,000 keys cached, the per-entry loops of a refresh cost 0.13 s
    of the event loop's CPU, reading two scattered objects per key every 30 s.

    During a refresh no slot is reused (slots freed meanwhile are held until it ends): a chunk's
    confirmation must not cover a key filled after the chunk was checked. A slot is confirmed only
    below the end its chunk had when it was checked (`upto`)."""

    __slots__ = ("fps", "free", "hashes", "held", "ids", "refreshing", "until", "upto")

    def __init__(self) -> None:
        self.ids = array("q")
        self.fps = array("q")
        self.hashes: list[str | None] = []
        self.free: list[int] = []
        self.held: list[int] = []  # freed during the refresh in progress
        self.refreshing = False
        # Per chunk of REFRESH_CHUNK slots: confirmed until then. A list, not an array: the
        # entries it confirms keep this very float (`KeyCache._confirmed`), one object per chunk
        # that stays in the CPU's caches, instead of one float per entry read from memory.
        self.until: list[float] = []
        self.upto = array("q")  # ... the chunk's slots below this one

    def __len__(self) -> int:
        return len(self.hashes)

    def take(self, secret_hash: str, key_pk: int, source: int) -> int:
        if self.free and not self.refreshing:
            slot = self.free.pop()
            self.ids[slot], self.fps[slot], self.hashes[slot] = key_pk, source, secret_hash
            return slot
        self.ids.append(key_pk)
        self.fps.append(source)
        self.hashes.append(secret_hash)
        return len(self.hashes) - 1

    def release(self, slot: int) -> None:
        self.ids[slot], self.fps[slot], self.hashes[slot] = 0, 0, None
        (self.held if self.refreshing else self.free).append(slot)

    def begin_refresh(self) -> int:
        """Start a refresh: returns the number of slots it covers."""
        self.refreshing = True
        return len(self.hashes)

    def end_refresh(self) -> None:
        self.refreshing = False
        self.free += self.held
        self.held = []

    def confirm(self, start: int, end: int, until: float) -> None:
        """The keys in slots start..end-1 (one chunk, checked just now) are fresh until `until`."""
        chunk = start // REFRESH_CHUNK
        while len(self.until) <= chunk:
            self.until.append(0.0)
            self.upto.append(0)
        self.until[chunk], self.upto[chunk] = until, end

    def confirmed_until(self, slot: int) -> float:
        """Until when the refresh confirmed the key in this slot (0: never)."""
        chunk = slot // REFRESH_CHUNK
        if chunk < len(self.until) and slot < self.upto[chunk]:
            return self.until[chunk]
        return 0.0


# Records share the values that many keys repeat: their type and status, their workspace's and
# environment's IDs, a permission set, an environment's origins. A cached key is then about half
# as many objects (with 100,000 keys cached, ~90 MB less heap), and the verifier's checks of the
# status and type compare a string with itself instead of reading one more object per key.
_K = TypeVar("_K", bound=Hashable)
_T = TypeVar("_T")
SHARED_SETS_MAX = 10_000  # distinct values a sharing table keeps (`shared`); then start over
_EMPTY: frozenset[str] = frozenset()
_shared_permissions: dict[frozenset[str], tuple[frozenset[str], tuple[str, ...]]] = {}
_shared_origins: dict[frozenset[str], frozenset[str]] = {}


def _text(value: object) -> str:
    return sys.intern(str(value))


def shared(table: dict[_K, _T], key: _K, make: Callable[[], _T]) -> _T:
    """The value `table` shares for `key`, made on first use; the table starts over at
    SHARED_SETS_MAX. (Also the activity memos' shared end times, `app.activity`.)"""
    value = table.get(key)
    if value is None:
        if len(table) >= SHARED_SETS_MAX:
            table.clear()
        value = table[key] = make()
    return value


def _permissions(names: set[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The shared (set, sorted tuple) of these permission names."""
    if not names:
        return _EMPTY, ()

    def make() -> tuple[frozenset[str], tuple[str, ...]]:
        listed = tuple(_text(name) for name in sorted(names))
        return frozenset(listed), listed

    return shared(_shared_permissions, frozenset(names), make)


def _origins(values: Any) -> frozenset[str]:
    """The shared set of an environment's authorized origins."""
    if not values:
        return _EMPTY
    key = frozenset(values)
    return shared(_shared_origins, key, lambda: key)


def record_from_model(key: ApiKey) -> KeyRecord:
    """The verification view of a key (environment, role and workspace already loaded)."""
    names = set(key.permissions)
    if key.role is not None:
        names.update(key.role.permissions)
    permissions, permission_list = _permissions(names)
    return KeyRecord(
        key_id=key.public_id,
        key_pk=key.id,
        key_type=_text(key.type.value),
        workspace_pk=key.workspace_id,
        workspace_id=_text(key.workspace.public_id),
        environment_pk=key.environment_id,
        environment_id=_text(key.environment.public_id),
        status=_text(key.status.value),
        permissions=permissions,
        permission_list=permission_list,
        allowed_networks=compile_allowlist(key.allowed_ips),
        authorized_origins=_origins(key.environment.authorized_origins)
        if key.type == KeyKind.CLIENT_SIDE
        else _EMPTY,
        expires_at=key.expires_at,
        grace_ends_at=key.grace_ends_at,
    )


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _time(value: Any) -> datetime | None:
    """Timestamps come back as datetimes (asyncpg) or ISO text (SQLite); always UTC-aware."""
    return None if value is None else as_utc(value)


def record_from_row(row: dict[str, Any]) -> KeyRecord:
    """The verification view of a key from a `_SELECT` row."""
    names = set(_json(row["permissions"]) or ())
    names.update(_json(row["role"]) or ())
    permissions, permission_list = _permissions(names)
    return KeyRecord(
        key_id=row["public_id"],
        key_pk=int(row["id"]),
        key_type=_text(row["type"]),
        workspace_pk=int(row["workspace_id"]),
        workspace_id=_text(row["ws"]),
        environment_pk=int(row["environment_id"]),
        environment_id=_text(row["env"]),
        status=_text(row["status"]),
        permissions=permissions,
        permission_list=permission_list,
        allowed_networks=compile_allowlist(_json(row["allowed_ips"]) or ()),
        authorized_origins=_origins(_json(row["authorized_origins"]))
        if row["type"] == KeyKind.CLIENT_SIDE.value
        else _EMPTY,
        expires_at=_time(row["expires_at"]),
        grace_ends_at=_time(row["grace_ends_at"]),
    )


def fingerprint(row: dict[str, Any]) -> int:
    """A summary of a row as read: an unchanged key is confirmed without being rebuilt
    (computed by PostgreSQL itself; on SQLite, from the values)."""
    if "fp" in row:
        return int(row["fp"])
    return hash(tuple(row.values()))


async def load_rows(secret_hashes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The raw rows of those hashes that name a key (one query)."""
    if not secret_hashes:
        return {}
    connection = connections.get("default")
    match, values = any_of(connection, secret_hashes)
    select = _PG_SELECT if connection.capabilities.dialect == "postgres" else _SELECT
    rows = await connection.execute_query_dict(select + "k.secret_hash " + match, values)
    return {row["secret_hash"]: row for row in rows}


def _int8s(values: Sequence[int]) -> bytes:
    """Big-endian int8s, as `_PG_MOVED` reads them (in C for an array)."""
    packed = array("q", values)
    if sys.byteorder == "little":
        packed.byteswap()
    return packed.tobytes()


async def moved_slots(ids: Sequence[int], sources: Sequence[int]) -> list[int]:
    """Of these cached keys (row IDs, 0 for none, and the fingerprints of the rows their records
    were built from), the positions of those whose row moved: changed, deleted, no longer joined,
    or no longer carrying the cached secret hash (the fingerprint covers it). On PostgreSQL one
    query, in which the database compares the fingerprints and names the moved rows only."""
    connection = connections.get("default")
    if connection.capabilities.dialect == "postgres":
        _, rows = await connection.execute_query(_PG_MOVED, [_int8s(ids), _int8s(sources)])
        return sorted(int(row[0]) for row in rows)
    # (A row can be held twice: under its old and its new secret hash after a rotation.)
    wanted = sorted({pk for pk in ids if pk})
    found: dict[int, int] = {}
    for low in range(0, len(wanted), MAX_BATCH):
        part = wanted[low : low + MAX_BATCH]
        sql = _SELECT + f"k.id IN ({','.join('?' * len(part))})"
        for row in await connection.execute_query_dict(sql, part):
            found[int(row["id"])] = fingerprint(row)
    held = zip(ids, sources, strict=True)
    return [i for i, (pk, fp) in enumerate(held) if pk and found.get(pk) != fp]


async def load_records(secret_hashes: Sequence[str]) -> dict[str, KeyRecord]:
    """The records of those hashes that name a key (one query)."""
    return {h: record_from_row(row) for h, row in (await load_rows(secret_hashes)).items()}


class KeyCache:
    """Bounded, invalidated cache of key records; also a ChangeFeed listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._slots = _Slots()  # what the refresh sends for the cached keys
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}
        self._generation = 0  # bumped by `clear`: no fill that started before it is stored
        # Lookups of keys invalidated while they were in flight: what they read is not stored,
        # and no caller that comes after the invalidation joins them (it starts a read of its
        # own). Only the fills of the keys named are affected; another key's invalidation does
        # not hold back a fill (other processes' NOTIFYs arrive at any moment).
        self._raced: set[asyncio.Future[KeyRecord | None]] = set()
        self._round = 0  # recency round (RECENCY_ROUNDS)
        self._fills = 0  # fills in this round
        self._fill_until = -math.inf  # the fresh_until the latest fills share (`_store`)
        self.hits = 0
        self.misses = 0
        # Jittered: the refreshes of many processes sharing one database spread out.
        self._refresher = Periodic(
            settings.cache_refresh_seconds, self._refresh_tick, jitter=REFRESH_JITTER
        )
        # Lookups that timed out and are still running.
        self._stuck: set[asyncio.Task[tuple[KeyRecord | None, int]]] = set()
        # The misses of this event-loop turn, waiting for their shared query (`_load`).
        self._batch: dict[str, asyncio.Future[tuple[KeyRecord | None, int]]] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # shared queries in flight
        # False while cross-process notifications may be missed (PostgreSQL listener down):
        # cached entries are then not served, every verification reads the database.
        self.trusted = True

    @property
    def _ttl(self) -> float:
        """How long a key's entry stays fresh after it was read or confirmed."""
        return 2 * self.settings.cache_refresh_seconds

    def __len__(self) -> int:
        return len(self._entries)

    async def keys_changed(self, secret_hashes: Sequence[str]) -> None:
        """Drop these keys now, in this process (called before the mutation returns)."""
        for secret_hash in secret_hashes:
            self.drop(secret_hash)

    def drop(self, secret_hash: str) -> None:
        """Drop one key (changed by this or another process); a fill of it in flight is not
        stored."""
        self._hold_back(secret_hash)
        self._forget(self._entries.pop(secret_hash, None))

    def _hold_back(self, secret_hash: str) -> None:
        """A lookup of this key now in flight may have read it before it changed: it is not
        stored, and later callers do not join it (the contract: refused from the moment the
        mutation returns)."""
        pending = self._inflight.pop(secret_hash, None)
        if pending is not None:
            self._raced.add(pending)

    def clear(self) -> None:
        self._generation += 1
        self._raced.update(self._inflight.values())
        self._inflight.clear()
        self._entries.clear()
        self._slots = _Slots()  # a refresh in progress sees it is no longer the cache's, and stops

    def _forget(self, entry: CacheEntry | None) -> None:
        """Free the slot of an entry that has left the cache."""
        if entry is not None and entry.slot >= 0:
            self._slots.release(entry.slot)
            entry.slot = -1

    def fresh(self, secret_hash: str) -> CacheEntry | None:
        """The fresh cached entry for this hash, or None: the no-I/O fast path of `get`. Only
        hashes of well-formed tokens are ever stored, so a hit also proves the token's shape."""
        entry = self._entries.get(secret_hash)
        if (
            entry is not None
            and self.trusted
            and (entry.fresh_until > (now := time.monotonic()) or self._confirmed(entry, now))
        ):
            if entry.round != self._round:
                entry.round = self._round
                self._entries.move_to_end(secret_hash)
            self.hits += 1
            return entry
        return None

    def _confirmed(self, entry: CacheEntry, now: float) -> bool:
        """Whether a refresh confirmed this entry (past its own fresh_until) until after `now`;
        if so, the entry remembers until when, and its next hits read no slot."""
        if entry.slot < 0:
            return False
        until = self._slots.confirmed_until(entry.slot)
        if until <= now:
            return False
        entry.fresh_until = until
        return True

    def last_confirmed(self, entry: CacheEntry) -> float:
        """When this key's entry was last read or confirmed (time.monotonic()): two refresh
        periods before its fresh_until."""
        until = entry.fresh_until
        if entry.slot >= 0:
            until = max(until, self._slots.confirmed_until(entry.slot))
        return until - self._ttl

    def holding(self, secret_hash: str, record: KeyRecord | None) -> CacheEntry | None:
        """The cached entry for this hash if it holds exactly `record` (no hit is counted)."""
        entry = self._entries.get(secret_hash)
        if entry is None or record is None or entry.record is not record:
            return None
        return entry

    async def get(self, secret_hash: str) -> KeyRecord | None:
        """The record for this hash (None when unknown); raises Unavailable when it cannot be
        known. A fresh cached entry costs no database round trip."""
        hit = self.fresh(secret_hash)
        if hit is not None:
            return hit.record
        now = time.monotonic()
        entry = self._entries.get(secret_hash)
        self.misses += 1
        pending = self._inflight.get(secret_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[secret_hash] = future
        generation = self._generation
        try:
            record, source = await self._bounded_load(secret_hash)
        except DATABASE_ERRORS as exc:
            # Not an entry invalidated while the lookup ran: that key changed for sure.
            stale_ok = (
                entry is not None
                and entry.record is not None
                and self._entries.get(secret_hash) is entry
                and time.monotonic() - self.last_confirmed(entry)
                <= self.settings.max_staleness_seconds
            )
            error = Unavailable("database unreachable")
            if stale_ok:
                assert entry is not None
                future.set_result(entry.record)
                return entry.record
            future.set_exception(error)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise error from exc
        else:
            future.set_result(record)
        finally:
            if self._inflight.get(secret_hash) is future:
                del self._inflight[secret_hash]
            raced = future in self._raced
            self._raced.discard(future)
            if not future.done():  # the loader died otherwise (cancelled, a bug): free waiters
                future.set_exception(Unavailable("key lookup abandoned"))
                future.exception()
        if generation == self._generation and not raced:
            self._store(secret_hash, record, source, now)
        return record

    def _store(self, secret_hash: str, record: KeyRecord | None, source: int, now: float) -> None:
        ttl = self._ttl if record is not None else self.settings.negative_cache_seconds
        self._forget(self._entries.get(secret_hash))
        until = now + ttl
        if record is not None:
            # Fills within FILL_UNTIL_SHARED of one another keep the first one's float (fresh a
            # little less long, never longer): a hit then reads no float of its entry's own.
            first = self._fill_until
            if first <= until < first + FILL_UNTIL_SHARED:
                until = first
            else:
                self._fill_until = until
        slot = self._slots.take(secret_hash, record.key_pk, source) if record is not None else -1
        self._entries[secret_hash] = CacheEntry(record, until, None, self._round, slot)
        self._entries.move_to_end(secret_hash)
        while len(self._entries) > self.settings.cache_size:
            self._forget(self._entries.popitem(last=False)[1])
        self._fills += 1
        if self._fills >= self.settings.cache_size // RECENCY_ROUNDS:
            self._round += 1
            self._fills = 0

    async def _bounded_load(self, secret_hash: str) -> tuple[KeyRecord | None, int]:
        """`_load`, waited for at most LOOKUP_TIMEOUT_SECONDS; raises TimeoutError (an OSError,
        so one of DATABASE_ERRORS) when the database does not answer in time."""
        if len(self._stuck) >= MAX_STUCK_LOOKUPS:
            raise TimeoutError("too many database lookups outstanding")
        task = asyncio.create_task(self._load(secret_hash))
        task.add_done_callback(self._landed)
        done, _ = await asyncio.wait({task}, timeout=LOOKUP_TIMEOUT_SECONDS)
        if not done:
            self._stuck.add(task)
            raise TimeoutError("database lookup timed out")
        return task.result()

    def _landed(self, task: asyncio.Task[tuple[KeyRecord | None, int]]) -> None:
        self._stuck.discard(task)
        if not task.cancelled():
            task.exception()  # read: a late failure nobody waits for must not be logged as lost

    async def _load(self, secret_hash: str) -> tuple[KeyRecord | None, int]:
        """The record (None: unknown) and row fingerprint of this hash, read by the query this
        event-loop turn's misses share (`_read_batch`)."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or len(batch) >= MAX_BATCH:
            batch = self._batch = {}
            # Called after the callbacks already due in this turn, so their misses join it.
            loop.call_soon(self._send_batch, batch)
        future = batch.get(secret_hash)
        if future is None:
            future = batch[secret_hash] = loop.create_future()
        # Shielded: a waiter that goes away must not cancel the answer another one awaits.
        return await asyncio.shield(future)

    def _send_batch(self, batch: dict[str, asyncio.Future[tuple[KeyRecord | None, int]]]) -> None:
        if self._batch is batch:
            self._batch = None
        task = asyncio.create_task(self._read_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _read_batch(
        self, batch: dict[str, asyncio.Future[tuple[KeyRecord | None, int]]]
    ) -> None:
        """One query for the batch's hashes; each waiter gets its own record or error (a row
        that cannot be read fails its own lookup only). Every future is resolved, whatever
        happens, so no waiter hangs (only this task resolves them, and waiters shield them)."""
        try:
            rows = await load_rows(list(batch))
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else Unavailable("key lookup abandoned")
            for future in batch.values():
                future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for secret_hash, future in batch.items():
            row = rows.get(secret_hash)
            try:
                found = (record_from_row(row), fingerprint(row)) if row is not None else (None, 0)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(found)

    async def refresh(self) -> tuple[int, int]:
        """Re-read every cached key in bulk: replace changed records, drop deleted keys, and
        confirm the rest for another two refresh periods. Returns (checked, changed or gone).
        Each chunk of slots asks which of its keys' rows moved (`moved_slots`: on PostgreSQL the
        database compares the fingerprints), then reads whole rows for those only, and confirms
        the chunk (`_Slots`). The keys are taken as they were when the refresh started: an entry
        invalidated or refilled since is left alone (it has a slot of its own, after those
        checked, or none), and one filled since is fresh already. A `clear` stops the refresh."""
        slots = self._slots
        count = slots.begin_refresh()
        checked = changed = 0
        try:
            for start in range(0, count, REFRESH_CHUNK):
                end = min(start + REFRESH_CHUNK, count)
                ids = slots.ids[start:end]
                held = len(ids) - ids.count(0)
                if not held:
                    continue
                positions = await moved_slots(ids, slots.fps[start:end])
                if slots is not self._slots:
                    break
                moved: dict[str, CacheEntry] = {}
                for position in positions:
                    secret_hash = slots.hashes[start + position]
                    if secret_hash is None:
                        continue  # freed since
                    entry = self._entries.get(secret_hash)
                    if entry is not None and entry.slot == start + position:
                        moved[secret_hash] = entry
                rows = await load_rows(list(moved)) if moved else {}
                if slots is not self._slots:
                    break
                fresh_until = time.monotonic() + self._ttl
                slots.confirm(start, end, fresh_until)
                checked += held
                if moved:
                    changed += self._apply_moved(moved, rows, fresh_until)
                await asyncio.sleep(0)  # let requests through between chunks
        finally:
            slots.end_refresh()
        return checked, changed

    def _apply_moved(
        self, moved: dict[str, CacheEntry], rows: dict[str, dict[str, Any]], fresh_until: float
    ) -> int:
        """Replace or drop the entries whose rows moved (`rows`: as read since, by secret hash).
        Returns how many changed or went."""
        changed = 0
        for secret_hash, old in moved.items():
            if self._entries.get(secret_hash) is not old:
                continue  # invalidated or refilled meanwhile
            row = rows.get(secret_hash)
            if row is None:  # gone: deleted, or no longer carrying this secret hash
                self.drop(secret_hash)
                changed += 1
                continue
            record, source = record_from_row(row), fingerprint(row)
            if record != old.record:
                self._hold_back(secret_hash)
                self._forget(old)
                slot = self._slots.take(secret_hash, record.key_pk, source)
                self._entries[secret_hash] = CacheEntry(record, fresh_until, None, old.round, slot)
                changed += 1
            else:
                self._slots.fps[old.slot] = source
        return changed

    async def _refresh_tick(self) -> None:
        try:
            checked, changed = await self.refresh()
        except DATABASE_ERRORS as exc:
            logger.warning("key cache refresh failed (%s)", type(exc).__name__)
        else:
            if changed:
                logger.info("key cache refresh: %d of %d keys changed", changed, checked)

    async def start(self) -> None:
        """Run the safety-net refresh in the background."""
        self._refresher.start()

    async def stop(self) -> None:
        await self._refresher.stop()
