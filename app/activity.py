"""Where keys are used from and which permissions they exercise: the inputs of the NEW_IP and
UNUSED_PERMISSION detectors. Like usage counting, observations are buffered in memory and
written in batches, never one write per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from app.background import Periodic
from app.cache import shared
from app.clock import Clock
from app.db import DATABASE_ERRORS, transaction
from app.net import Address, ip_allowed, parse_address
from app.permissions import is_permission, missing_permissions
from app.settings import Settings
from app.verifier import KeyRecord
from models import Anomaly, KeyIp, KeyPermissionUse

logger = logging.getLogger("keyplane.activity")

MAX_BUFFERED = 50_000
IP_TEXT_LIMIT = 45  # `key_ips.ip`: an IPv6 address with a zone (`fe80::1%eth0`) can be longer
MAX_ANOMALIES_PER_KEY_PER_FLUSH = 20
MAX_REMEMBERED = 200_000  # written (key, IP) and (key, permission) pairs kept in memory
LAST_SEEN_PRECISION = timedelta(hours=1)  # NEW_IP works in days: last_seen needs no more
# Keys named per read of what the database already knows: a flush can hold MAX_BUFFERED keys, more
# than one statement may bind (PostgreSQL: 32,767 parameters; SQLite: 32,766 by default).
READ_CHUNK = 5000


def _chunks(values: list[str]) -> list[list[str]]:
    return [values[start : start + READ_CHUNK] for start in range(0, len(values), READ_CHUNK)]


@dataclass
class _Seen:
    record: KeyRecord
    first: datetime
    last: datetime


@dataclass
class _Asked:
    record: KeyRecord
    held: bool
    first: datetime


class ActivityRecorder:
    """Buffers (key, IP) sightings and (key, permission) requests; `flush` turns first sightings
    into anomalies and remembers them."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._ips: dict[tuple[str, str], _Seen] = {}
        self._permissions: dict[tuple[str, str], _Asked] = {}
        # What the database already knows, so a hot key costs no write per flush: the (key, IP)
        # pairs with the last_seen stored for them, and the permissions each key has used.
        self._stored_ips: dict[tuple[str, str], datetime] = {}
        self._stored_permissions: set[tuple[str, str]] = set()
        # The seen_until times that keys' memos hold, cut to the minute and shared: one object
        # per minute that stays in the CPU's caches, where a time of each key's own was one more
        # object for a verification to read from memory (about 0.3 us with 100,000 keys in use).
        self._untils: dict[datetime, datetime] = {}
        self.dropped = 0
        self._lock = asyncio.Lock()
        self._loop = Periodic(settings.flush_interval_seconds, self.flush, self._lock)

    @property
    def pending(self) -> int:
        """Observations buffered and not yet written."""
        return len(self._ips) + len(self._permissions)

    def observe(
        self, *, now: datetime, key: KeyRecord | None, ip: str, required: Sequence[str]
    ) -> None:
        """Note one verification that named a known key. O(1), no I/O."""
        if key is not None:
            address = parse_address(ip)
            self.observe_address(
                now=now,
                key=key,
                address=address,
                text=str(address) if address is not None else "",
                required=required,
            )

    def observe_address(
        self,
        *,
        now: datetime,
        key: KeyRecord,
        address: Address | None,
        text: str,
        required: Sequence[str],
    ) -> None:
        """`observe` for a caller that already holds the parsed client address and its text."""
        memo = key.tally
        if text == memo.seen_ip and now < memo.seen_until:
            pass  # the same IP as last time, written within the hour (below)
        else:
            marker_ip = (key.key_id, text)
            stored = self._stored_ips.get(marker_ip)
            if stored is not None and now < (until := stored + LAST_SEEN_PRECISION):
                # Seen within the hour and written: nothing to learn or to write, and the key
                # remembers it, so the next request from this IP needs no lookup.
                memo.seen_ip, memo.seen_until = text, self._shared_until(until)
            elif (
                address is not None
                and len(text) <= IP_TEXT_LIMIT  # else not storable, and no use for NEW_IP
                and not (
                    # An IP on the key's own allowlist is expected, never news.
                    key.allowed_networks and ip_allowed(address, key.allowed_networks)
                )
            ):
                seen = self._ips.get(marker_ip)
                if seen is not None:
                    seen.last = now
                elif len(self._ips) < MAX_BUFFERED:
                    self._ips[marker_ip] = _Seen(key, now, now)
                else:
                    self.dropped += 1
        for permission in required:
            marker = (key.key_id, permission)
            if marker in self._permissions or marker in self._stored_permissions:
                continue
            if not is_permission(permission):
                # No key can hold it, so its first use is no news; and it may not be storable
                # (NUL, longer than the column: two such that share their first 128
                # characters made the flush fail on the unique index, every time).
                continue
            if len(self._permissions) >= MAX_BUFFERED:
                self.dropped += 1
                continue
            held = not missing_permissions(key.permissions, (permission,))
            self._permissions[marker] = _Asked(key, held, now)

    def _shared_until(self, until: datetime) -> datetime:
        """`until` cut to the minute (a memo ends up to a minute early: one more lookup), as an
        object that every memo ending in that minute shares."""
        minute = until.replace(second=0, microsecond=0)
        return shared(self._untils, minute, lambda: minute)

    async def flush(self) -> int:
        """Write buffered observations; returns the number of anomalies detected. On a database
        error the observations go back into the buffer for the next attempt."""
        async with self._lock:
            return await self._flush()

    async def _flush(self) -> int:
        ips, self._ips = self._ips, {}
        permissions, self._permissions = self._permissions, {}
        if not ips and not permissions:
            return 0
        try:
            return await self._write(ips, permissions)
        except DATABASE_ERRORS:
            logger.warning("activity flush failed; keeping %d observations", len(ips))
            self._put_back(self._ips, ips)
            self._put_back(self._permissions, permissions)
            return 0

    def _put_back(self, buffer: dict[Any, Any], taken: dict[Any, Any]) -> None:
        """A failed flush's observations, back into `buffer` (kept to MAX_BUFFERED, as new ones
        are: beyond that they count as dropped)."""
        for marker, observation in taken.items():
            if marker in buffer:
                continue
            if len(buffer) < MAX_BUFFERED:
                buffer[marker] = observation
            else:
                self.dropped += 1

    async def _write(
        self, ips: dict[tuple[str, str], _Seen], permissions: dict[tuple[str, str], _Asked]
    ) -> int:
        anomalies: list[Anomaly] = []
        per_key: dict[str, int] = {}
        window = timedelta(days=self.settings.new_ip_days)

        def add(record: KeyRecord, kind: str, at: datetime, detail: str) -> None:
            count = per_key.get(record.key_id, 0)
            if count < MAX_ANOMALIES_PER_KEY_PER_FLUSH:
                anomalies.append(
                    Anomaly(
                        workspace_id=record.workspace_pk,
                        environment_id=record.environment_pk,
                        key_id=record.key_id,
                        kind=kind,
                        detected_at=at,
                        detail=detail[:300],
                    )
                )
            per_key[record.key_id] = count + 1

        stored_ips: dict[tuple[str, str], datetime] = {}
        stored_permissions: set[tuple[str, str]] = set()
        new_ips: list[KeyIp] = []
        new_permissions: list[KeyPermissionUse] = []
        async with transaction():
            key_ids = sorted({key_id for key_id, _ in ips})
            known: dict[tuple[str, str], KeyIp] = {}
            keys_with_history: set[str] = set()
            for chunk in _chunks(key_ids):
                for history in await KeyIp.filter(key_id__in=chunk):
                    known[(history.key_id, history.ip)] = history
                    keys_with_history.add(history.key_id)
            for (key_id, ip), seen in sorted(ips.items(), key=lambda item: item[1].first):
                row = known.get((key_id, ip))
                if row is None:
                    # A key's very first IP sets its baseline; later new ones are news. A key
                    # with an allowlist has its baseline already: any IP off it is news.
                    if key_id in keys_with_history or seen.record.allowed_networks:
                        add(
                            seen.record,
                            "NEW_IP",
                            seen.first,
                            f"first request from {ip} in {self.settings.new_ip_days} days",
                        )
                    keys_with_history.add(key_id)
                    new_ips.append(
                        KeyIp(key_id=key_id, ip=ip, first_seen=seen.first, last_seen=seen.last)
                    )
                    stored_ips[(key_id, ip)] = seen.last
                else:
                    if row.last_seen < seen.first - window:
                        add(
                            seen.record,
                            "NEW_IP",
                            seen.first,
                            f"first request from {ip} in {self.settings.new_ip_days} days "
                            f"(last seen {row.last_seen:%Y-%m-%d})",
                        )
                    if seen.last - row.last_seen >= LAST_SEEN_PRECISION:
                        await KeyIp.filter(id=row.id).update(last_seen=seen.last)
                    stored_ips[(key_id, ip)] = max(row.last_seen, seen.last)
            perm_keys = sorted({key_id for key_id, _ in permissions})
            used: set[tuple[str, str]] = set()
            for chunk in _chunks(perm_keys):
                used.update(
                    (use.key_id, use.permission)
                    for use in await KeyPermissionUse.filter(key_id__in=chunk)
                )
            for (key_id, permission), asked in permissions.items():
                stored_permissions.add((key_id, permission))
                if (key_id, permission) in used:
                    continue
                if asked.held:
                    detail = f"first use of permission {permission}"
                else:
                    detail = f"asked for permission {permission}, which it does not hold"
                add(asked.record, "UNUSED_PERMISSION", asked.first, detail)
                new_permissions.append(
                    KeyPermissionUse(key_id=key_id, permission=permission, first_used=asked.first)
                )
            if new_ips:
                await KeyIp.bulk_create(new_ips, batch_size=1000)
            if new_permissions:
                await KeyPermissionUse.bulk_create(new_permissions, batch_size=1000)
            if anomalies:
                await Anomaly.bulk_create(anomalies, batch_size=1000)
        # Committed: remember what the database now knows (bounded; forgetting costs a read).
        if len(self._stored_ips) + len(stored_ips) > MAX_REMEMBERED:
            self._stored_ips.clear()
        self._stored_ips.update(stored_ips)
        if len(self._stored_permissions) + len(stored_permissions) > MAX_REMEMBERED:
            self._stored_permissions.clear()
        self._stored_permissions |= stored_permissions
        return len(anomalies)

    async def start(self) -> None:
        """Flush in the background every flush interval."""
        self._loop.start()

    async def stop(self) -> None:
        """Stop the loop and write what is left (a flush in progress finishes first)."""
        await self._loop.stop()
        await self.flush()
