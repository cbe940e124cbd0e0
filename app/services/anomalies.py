"""Anomaly detection operators can act on.

- NEW_IP, UNUSED_PERMISSION: detected when observations are flushed (app.activity) and stored.
- FAILURE_SPIKE: a key's failed verifications in the last hour (the current and the previous
  hourly bucket) against its own hourly average over the rest of the baseline window; a spike
  when at least `failure_spike_floor` and at least `failure_spike_factor` times the baseline
  (a baseline under 1/hour counts as 1).
- OFF_HOURS: hourly usage buckets outside the workspace's business hours (none set: no
  detector). Buckets are UTC hours, so for a time zone with a non-whole-hour offset the edge
  hour is judged by its start.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from app.db import as_utc, transaction
from app.errors import ValidationFailed
from app.permissions import KEY_UPDATE, KEY_VIEW
from app.services import Services, audit
from app.services.environments import get_environment
from app.services.principal import Principal
from app.services.validation import utc_moment
from models import Anomaly, UsageBucket, Workspace

MAX_ANOMALIES = 500
KEY_BUCKETS = "key_"  # per-key usage buckets; per-environment totals are keyed by "env_…"
DEFAULT_WINDOW = timedelta(hours=24)
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class BusinessHours:
    time_zone: str
    days: tuple[int, ...]  # ISO weekdays: 1 = Monday … 7 = Sunday
    start_hour: int
    end_hour: int  # exclusive

    def as_json(self) -> dict[str, Any]:
        return {
            "timeZone": self.time_zone,
            "days": list(self.days),
            "startHour": self.start_hour,
            "endHour": self.end_hour,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any] | None) -> BusinessHours | None:
        if not value:
            return None
        return cls(
            time_zone=str(value["timeZone"]),
            days=tuple(int(d) for d in value["days"]),
            start_hour=int(value["startHour"]),
            end_hour=int(value["endHour"]),
        )

    def describe(self) -> str:
        days = ",".join(DAY_NAMES[d - 1] for d in self.days)
        return f"{days} {self.start_hour:02d}:00-{self.end_hour:02d}:00 {self.time_zone}"

    def contains(self, moment: datetime) -> bool:
        local = moment.astimezone(ZoneInfo(self.time_zone))
        return local.isoweekday() in self.days and self.start_hour <= local.hour < self.end_hour


@dataclass(frozen=True)
class Finding:
    kind: str
    key_id: str
    detected_at: datetime
    detail: str


def check_business_hours(hours: BusinessHours) -> BusinessHours:
    """Validate business hours; every failure names the bad value."""
    try:
        ZoneInfo(hours.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationFailed(
            f"unknown time zone {hours.time_zone!r} (use an IANA name such as Europe/Paris)",
            field="timeZone",
        ) from None
    if not hours.days or any(d < 1 or d > 7 for d in hours.days):
        raise ValidationFailed(
            f"days={list(hours.days)} must be ISO weekdays 1 (Monday) to 7 (Sunday)", "days"
        )
    if not 0 <= hours.start_hour < hours.end_hour <= 24:
        raise ValidationFailed(
            f"startHour={hours.start_hour}, endHour={hours.end_hour}: need "
            "0 <= startHour < endHour <= 24",
            field="startHour",
        )
    return BusinessHours(
        hours.time_zone, tuple(sorted(set(hours.days))), hours.start_hour, hours.end_hour
    )


async def set_business_hours(
    services: Services, principal: Principal, hours: BusinessHours | None
) -> Workspace:
    """Set (or with None, clear) the workspace's business hours for OFF_HOURS detection."""
    principal.require(KEY_UPDATE)
    cleaned = check_business_hours(hours) if hours is not None else None
    now = services.clock.now()
    async with transaction():
        workspace = await Workspace.get(id=principal.workspace_id)
        workspace.business_hours = cleaned.as_json() if cleaned else None
        await workspace.save(update_fields=["business_hours"])
        await audit.record(
            principal,
            "workspace.set_business_hours",
            now,
            hours=cleaned.describe() if cleaned else None,
        )
    return workspace


async def list_anomalies(
    services: Services,
    principal: Principal,
    environment_id: str | None,
    since: datetime | None,
) -> list[Finding]:
    """Every anomaly of the workspace (or one environment) since `since` (default 24 h), newest
    first, at most MAX_ANOMALIES."""
    principal.require(KEY_VIEW)
    settings = services.settings
    now = services.clock.now()
    since = utc_moment(since, "since") if since is not None else now - DEFAULT_WINDOW
    env_pk = None
    if environment_id is not None:
        env_pk = (await get_environment(principal, environment_id)).id
    scope: dict[str, Any] = {"workspace_id": principal.workspace_id}
    if env_pk is not None:
        scope["environment_id"] = env_pk

    findings = [
        Finding(row.kind, row.key_id, row.detected_at, row.detail)
        for row in await Anomaly.filter(**scope, detected_at__gte=since)
        .order_by("-detected_at")
        .limit(MAX_ANOMALIES)
    ]

    # FAILURE_SPIKE: the last hour against the key's own baseline.
    hour_start = now.replace(minute=0, second=0, microsecond=0)
    recent_from = hour_start - timedelta(hours=1)
    baseline_from = now - timedelta(days=settings.failure_baseline_days)
    recent: dict[str, int] = defaultdict(int)
    baseline: dict[str, int] = defaultdict(int)
    latest: dict[str, datetime] = {}
    buckets = await UsageBucket.filter(
        **scope,
        key_id__startswith=KEY_BUCKETS,
        bucket_start__gte=baseline_from,
        failed_requests__gt=0,
    )
    for bucket in buckets:
        if bucket.bucket_start >= recent_from:
            recent[bucket.key_id] += bucket.failed_requests
            start = as_utc(bucket.bucket_start)
            # The spike's time is its latest bucket's start; `since` only filters (below).
            latest[bucket.key_id] = max(latest.get(bucket.key_id, start), start)
        else:
            baseline[bucket.key_id] += bucket.failed_requests
    hours = max(1.0, (recent_from - baseline_from).total_seconds() / 3600)
    for key_id, failed in recent.items():
        average = baseline[key_id] / hours
        if latest[key_id] < since.replace(minute=0, second=0, microsecond=0):
            continue
        if failed >= settings.failure_spike_floor and failed >= (
            settings.failure_spike_factor * max(average, 1.0)
        ):
            findings.append(
                Finding(
                    "FAILURE_SPIKE",
                    key_id,
                    latest[key_id],
                    f"{failed} failed verifications in the last hour; baseline "
                    f"{average:.1f}/hour over {settings.failure_baseline_days} days",
                )
            )

    # OFF_HOURS: any use in an hour outside business hours.
    workspace = await Workspace.get(id=principal.workspace_id)
    hours_set = BusinessHours.from_json(workspace.business_hours)
    if hours_set is not None:
        zone = ZoneInfo(hours_set.time_zone)
        since_hour = since.replace(minute=0, second=0, microsecond=0)
        # A key's hour can be several rows (one per process that wrote it): summed.
        used: dict[tuple[str, datetime], int] = defaultdict(int)
        for key_id, start, total in await UsageBucket.filter(
            **scope,
            key_id__startswith=KEY_BUCKETS,
            bucket_start__gte=since_hour,
            total_requests__gt=0,
        ).values_list("key_id", "bucket_start", "total_requests"):
            used[(key_id, as_utc(start))] += total
        for (key_id, start), total in sorted(used.items(), key=lambda u: u[0][1], reverse=True):
            if hours_set.contains(start):
                continue
            local = start.astimezone(zone)
            findings.append(
                Finding(
                    "OFF_HOURS",
                    key_id,
                    start,
                    f"{total} requests at {local:%a %Y-%m-%d %H:00} "
                    f"{hours_set.time_zone}, outside business hours ({hours_set.describe()})",
                )
            )
    findings.sort(key=lambda f: f.detected_at, reverse=True)
    return findings[:MAX_ANOMALIES]
