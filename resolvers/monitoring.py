"""Usage reports and the denial log (thin: the rules live in app.services.monitoring)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

import strawberry

from app.services import monitoring
from resolvers.context import Info
from resolvers.scalars import BigInt
from resolvers.types import KeyUsage, PageInfo


@strawberry.enum(name="Granularity")
class Granularity(Enum):
    HOUR = "HOUR"
    DAY = "DAY"


@strawberry.type(name="UsageBucket")
class UsageBucketType:
    start: datetime
    total_requests: BigInt
    successful_requests: BigInt
    failed_requests: BigInt


@strawberry.type(name="UsageReport")
class UsageReportType:
    totals: KeyUsage
    series: list[UsageBucketType]


@strawberry.type(name="Denial")
class DenialType:
    id: strawberry.ID
    at: datetime
    key_id: strawberry.ID | None
    ip: str = strawberry.field(description="The resolved client IP; `(many)` for folded floods.")
    origin: str | None
    code: str
    message: str
    count: int = strawberry.field(
        description="Refusals this row stands for: 1, or more when a flood was folded."
    )


@strawberry.type(name="DenialEdge")
class DenialEdge:
    node: DenialType
    cursor: str


@strawberry.type(name="DenialConnection")
class DenialConnection:
    edges: list[DenialEdge]
    page_info: PageInfo
    total_count: int


@strawberry.type(name="IpDenials")
class IpDenials:
    ip: str
    count: int
    last_at: datetime
    codes: list[str]


@strawberry.type
class MonitoringQueries:
    @strawberry.field(
        description="Verification counts with empty buckets filled in: per key, per "
        "environment, or (neither given) the whole workspace. Default range: the last 24 hours "
        "(HOUR) or 30 days (DAY); at most 90 days hourly, 400 days daily. Buckets are UTC."
    )
    async def usage(
        self,
        info: Info,
        key_id: strawberry.ID | None = None,
        environment_id: strawberry.ID | None = None,
        from_: Annotated[datetime | None, strawberry.argument(name="from")] = None,
        to: datetime | None = None,
        granularity: Granularity | None = Granularity.HOUR,
    ) -> UsageReportType:
        report = await monitoring.usage_report(
            info.context.services,
            info.context.operator,
            str(key_id) if key_id is not None else None,
            str(environment_id) if environment_id is not None else None,
            from_,
            to,
            monitoring.Granularity(granularity.value if granularity else "HOUR"),
        )
        return UsageReportType(
            totals=KeyUsage(
                total_requests=BigInt(report.total),
                successful_requests=BigInt(report.successful),
                failed_requests=BigInt(report.failed),
                last_used_at=report.last_used_at,
            ),
            series=[
                UsageBucketType(
                    start=b.start,
                    total_requests=BigInt(b.total),
                    successful_requests=BigInt(b.successful),
                    failed_requests=BigInt(b.failed),
                )
                for b in report.series
            ],
        )

    @strawberry.field(description="Refused verifications, newest first.")
    async def denials(
        self,
        info: Info,
        key_id: strawberry.ID | None = None,
        ip: str | None = None,
        code: str | None = None,
        since: datetime | None = None,
        first: int | None = 50,
        after: str | None = None,
    ) -> DenialConnection:
        page = await monitoring.list_denials(
            info.context.operator,
            str(key_id) if key_id is not None else None,
            ip,
            code,
            since,
            first,
            after,
        )
        edges = [
            DenialEdge(
                node=DenialType(
                    id=strawberry.ID(f"den_{row.id}"),
                    at=row.at,
                    key_id=strawberry.ID(row.key_id) if row.key_id else None,
                    ip=row.ip,
                    origin=row.origin,
                    code=row.code,
                    message=row.message,
                    count=row.count,
                ),
                cursor=cursor,
            )
            for row, cursor in zip(page.rows, page.cursors, strict=True)
        ]
        return DenialConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None
            ),
            total_count=page.total,
        )

    @strawberry.field(
        description="Recent denials grouped by client IP, most first (default: the last 24 "
        "hours; at most 100 IPs)."
    )
    async def denials_by_ip(
        self, info: Info, since: datetime | None = None, environment_id: strawberry.ID | None = None
    ) -> list[IpDenials]:
        rows = await monitoring.denials_by_ip(
            info.context.services,
            info.context.operator,
            since,
            str(environment_id) if environment_id is not None else None,
        )
        return [IpDenials(ip=r.ip, count=r.count, last_at=r.last_at, codes=r.codes) for r in rows]
