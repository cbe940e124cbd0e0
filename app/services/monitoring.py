"""Usage reports and the denial log, read from what `app.usage` flushes.

Usage: hourly buckets per key and per environment are written by the batched flush; a report
reads them (never raw events), sums them into the requested granularity and fills the empty
buckets so a chart can draw them. Ranges are bounded: at most MAX_HOURLY_DAYS of hourly buckets
and MAX_DAILY_DAYS of daily ones (UTC days). Without a key or an environment the report covers
the whole workspace.

Denials: newest first, keyset-paginated on (at, id). `denials_by_ip` groups the log by client IP
(most denials first, at most MAX_IPS rows); folded flood rows count with their `count`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from tortoise.expressions import Q
from tortoise.functions import Max, Sum

from app.db import as_utc, latest
from app.errors import NotFound, ValidationFailed
from app.net import parse_address
from app.permissions import KEY_VIEW
from app.services import Services
from app.services.environments import get_environment
from app.services.keys import check_page_size, decode_cursor, encode_cursor
from app.services.principal import Principal
from app.services.validation import require_public_id, utc_moment
from app.usage import MANY_IPS, key_totals
from app.verifier import Code
from models import ApiKey, Denial, Environment, UsageBucket

MAX_HOURLY_DAYS = 90
MAX_DAILY_DAYS = 400
DEFAULT_HOURLY = timedelta(hours=24)
DEFAULT_DAILY = timedelta(days=30)
DEFAULT_DENIAL_WINDOW = timedelta(hours=24)
MAX_IPS = 100
REFUSAL_CODES = frozenset(c.value for c in Code if c is not Code.VALID)
UNRESOLVED_IPS = frozenset({"unknown", MANY_IPS})


class Granularity(str, Enum):
    HOUR = "HOUR"
    DAY = "DAY"


@dataclass
class Bucket:
    start: datetime
    total: int = 0
    successful: int = 0
    failed: int = 0


@dataclass
class UsageReport:
    total: int
    successful: int
    failed: int
    last_used_at: datetime | None
    series: list[Bucket]


def _floor(moment: datetime, granularity: Granularity) -> datetime:
    moment = moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if granularity is Granularity.DAY else moment


def _range(
    now: datetime, start: datetime | None, end: datetime | None, granularity: Granularity
) -> tuple[datetime, datetime]:
    """[first bucket start, end) with both ends checked and the span bounded."""
    step = timedelta(days=1) if granularity is Granularity.DAY else timedelta(hours=1)
    end = utc_moment(end, "to") if end is not None else now.astimezone(UTC)
    default = DEFAULT_DAILY if granularity is Granularity.DAY else DEFAULT_HOURLY
    start = utc_moment(start, "from") if start is not None else end - default
    if start >= end:
        raise ValidationFailed(
            f"from {start.isoformat()!r} must be before to {end.isoformat()!r}", "from"
        )
    limit_days = MAX_DAILY_DAYS if granularity is Granularity.DAY else MAX_HOURLY_DAYS
    if end - start > timedelta(days=limit_days):
        raise ValidationFailed(
            f"range {start.isoformat()} to {end.isoformat()} is {(end - start).days} days; "
            f"{granularity.value} granularity allows at most {limit_days} days",
            "from",
        )
    first = _floor(start, granularity)
    # The last bucket is the one holding the instant just before `end`.
    last = _floor(end - timedelta(microseconds=1), granularity)
    return first, last + step


async def usage_report(
    services: Services,
    principal: Principal,
    key_id: str | None,
    environment_id: str | None,
    start: datetime | None,
    end: datetime | None,
    granularity: Granularity,
) -> UsageReport:
    principal.require(KEY_VIEW)
    first, stop = _range(services.clock.now(), start, end, granularity)
    step = timedelta(days=1) if granularity is Granularity.DAY else timedelta(hours=1)
    rows = UsageBucket.filter(
        workspace_id=principal.workspace_id, bucket_start__gte=first, bucket_start__lt=stop
    )
    environment: Environment | None = None
    if environment_id is not None:
        environment = await get_environment(principal, environment_id)
    if key_id is not None:
        require_public_id(key_id, "key", "keyId")
        key = await ApiKey.get_or_none(public_id=key_id, workspace_id=principal.workspace_id)
        if key is None:
            raise NotFound(f"key {key_id!r} not found")
        if environment is not None and key.environment_id != environment.id:
            raise ValidationFailed(
                f"key {key_id!r} is not in environment {environment_id!r}", "keyId"
            )
        rows = rows.filter(key_id=key_id)
        # Its counters and pending buckets in one statement (a roll-up moves one to the other).
        totals = (await key_totals([key_id])).get(key_id)
        last_used = totals.last_used_at if totals else latest(key.last_used_at)
    else:
        keys = ApiKey.filter(workspace_id=principal.workspace_id)
        if environment is not None:
            rows = rows.filter(key_id=environment.public_id)
            keys = keys.filter(environment_id=environment.id)
            env_ids = [environment.public_id]
        else:
            rows = rows.filter(key_id__startswith="env_")
            env_ids = [
                str(e)
                for e in await Environment.filter(workspace_id=principal.workspace_id).values_list(
                    "public_id", flat=True
                )
            ]
        # The keys' counters cover rolled-up hours; the environments' buckets carry the latest
        # use of every hour written since (pending or not).
        stored = await keys.annotate(latest=Max("last_used_at")).first().values("latest")
        recent = (
            await UsageBucket.filter(key_id__in=env_ids)
            .annotate(latest=Max("last_used_at"))
            .first()
            .values("latest")
        )
        last_used = latest(
            stored["latest"] if stored else None, recent["latest"] if recent else None
        )
    series: dict[datetime, Bucket] = {}
    moment = first
    while moment < stop:
        series[moment] = Bucket(moment)
        moment += step
    for start_at, total, ok, failed in await rows.values_list(
        "bucket_start", "total_requests", "successful_requests", "failed_requests"
    ):
        bucket = series[_floor(start_at.astimezone(UTC), granularity)]
        bucket.total += total
        bucket.successful += ok
        bucket.failed += failed
    buckets = list(series.values())
    return UsageReport(
        total=sum(b.total for b in buckets),
        successful=sum(b.successful for b in buckets),
        failed=sum(b.failed for b in buckets),
        last_used_at=last_used,
        series=buckets,
    )


@dataclass
class DenialPage:
    rows: list[Denial]
    cursors: list[str]
    has_next: bool
    total: int  # every denial record the filters match, on every page


def _check_ip(ip: str) -> str:
    if ip in UNRESOLVED_IPS:
        return ip
    address = parse_address(ip)
    if address is None:
        shown = ip if len(ip) <= 64 else ip[:64] + "…"
        raise ValidationFailed(f"ip {shown!r} is not an IP address", "ip")
    return str(address)


def _check_code(code: str) -> str:
    if code not in REFUSAL_CODES:
        shown = code if len(code) <= 64 else code[:64] + "…"
        allowed = ", ".join(sorted(REFUSAL_CODES))
        raise ValidationFailed(
            f"code {shown!r} is not a refusal code; use one of {allowed}", "code"
        )
    return code


async def list_denials(
    principal: Principal,
    key_id: str | None,
    ip: str | None,
    code: str | None,
    since: datetime | None,
    first: int | None,
    after: str | None,
) -> DenialPage:
    principal.require(KEY_VIEW)
    first = check_page_size(first)
    query = Denial.filter(workspace_id=principal.workspace_id)
    if key_id is not None:
        require_public_id(key_id, "key", "keyId")
        if not await ApiKey.exists(public_id=key_id, workspace_id=principal.workspace_id):
            raise NotFound(f"key {key_id!r} not found")
        query = query.filter(key_id=key_id)
    if ip is not None:
        query = query.filter(ip=_check_ip(ip))
    if code is not None:
        query = query.filter(code=_check_code(code))
    if since is not None:
        query = query.filter(at__gte=utc_moment(since, "since"))
    total = await query.count()
    if after is not None:
        row_id = decode_cursor("den", after)
        anchor = await Denial.get_or_none(id=row_id, workspace_id=principal.workspace_id)
        if anchor is None:
            raise ValidationFailed(f"cursor {after!r} points at no denial", "after")
        query = query.filter(Q(at__lt=anchor.at) | Q(at=anchor.at, id__lt=anchor.id))
    rows = await query.order_by("-at", "-id").limit(first + 1)
    page = rows[:first]
    return DenialPage(
        rows=page,
        cursors=[encode_cursor("den", r.id) for r in page],
        has_next=len(rows) > first,
        total=total,
    )


@dataclass
class IpDenials:
    ip: str
    count: int
    last_at: datetime
    codes: list[str]


async def denials_by_ip(
    services: Services, principal: Principal, since: datetime | None, environment_id: str | None
) -> list[IpDenials]:
    principal.require(KEY_VIEW)
    since = (
        utc_moment(since, "since")
        if since is not None
        else services.clock.now() - DEFAULT_DENIAL_WINDOW
    )
    query = Denial.filter(workspace_id=principal.workspace_id, at__gte=since)
    if environment_id is not None:
        environment = await get_environment(principal, environment_id)
        query = query.filter(environment_id=environment.id)
    grouped = (
        await query.annotate(total=Sum("count"), last=Max("at"))
        .group_by("ip")
        .order_by("-total", "ip")
        .limit(MAX_IPS)
        .values("ip", "total", "last")
    )
    ips = [row["ip"] for row in grouped]
    codes: dict[str, set[str]] = defaultdict(set)
    if ips:
        for ip, code in await query.filter(ip__in=ips).distinct().values_list("ip", "code"):
            codes[ip].add(code)
    return [
        IpDenials(
            ip=row["ip"],
            count=int(row["total"]),
            last_at=as_utc(row["last"]),
            codes=sorted(codes[row["ip"]]),
        )
        for row in grouped
    ]
