"""Anomalies and the workspace business hours they are judged against."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated

import strawberry

from app.errors import DomainError
from app.services import anomalies as anomaly_service
from resolvers.context import Info
from resolvers.errors import ValidationFailedError, error_value


@strawberry.enum(name="AnomalyKind")
class AnomalyKind(Enum):
    NEW_IP = "NEW_IP"
    FAILURE_SPIKE = "FAILURE_SPIKE"
    OFF_HOURS = "OFF_HOURS"
    UNUSED_PERMISSION = "UNUSED_PERMISSION"


@strawberry.type(name="Anomaly")
class AnomalyType:
    kind: AnomalyKind
    key_id: strawberry.ID | None
    detected_at: datetime
    detail: str


@strawberry.type(name="BusinessHours")
class BusinessHoursType:
    time_zone: str
    days: list[int] = strawberry.field(description="ISO weekdays: 1 = Monday … 7 = Sunday.")
    start_hour: int
    end_hour: int = strawberry.field(description="Exclusive.")

    @classmethod
    def from_value(cls, hours: anomaly_service.BusinessHours) -> BusinessHoursType:
        return cls(
            time_zone=hours.time_zone,
            days=list(hours.days),
            start_hour=hours.start_hour,
            end_hour=hours.end_hour,
        )


@strawberry.input
class BusinessHoursInput:
    time_zone: str
    days: list[int]
    start_hour: int
    end_hour: int


@strawberry.type
class SetBusinessHoursSuccess:
    business_hours: BusinessHoursType | None


SetBusinessHoursResult = Annotated[
    SetBusinessHoursSuccess | ValidationFailedError, strawberry.union("SetBusinessHoursResult")
]


@strawberry.type
class AnomalyQueries:
    @strawberry.field(description="Anomalies since `since` (default: the last 24 hours).")
    async def anomalies(
        self, info: Info, environment_id: strawberry.ID | None = None, since: datetime | None = None
    ) -> list[AnomalyType]:
        findings = await anomaly_service.list_anomalies(
            info.context.services,
            info.context.operator,
            str(environment_id) if environment_id is not None else None,
            since,
        )
        return [
            AnomalyType(
                kind=AnomalyKind(f.kind),
                key_id=strawberry.ID(f.key_id),
                detected_at=f.detected_at,
                detail=f.detail,
            )
            for f in findings
        ]


@strawberry.type
class AnomalyMutations:
    @strawberry.mutation(description="Business hours for OFF_HOURS detection; null clears them.")
    async def set_business_hours(
        self, info: Info, hours: BusinessHoursInput | None
    ) -> SetBusinessHoursResult:
        value = (
            anomaly_service.BusinessHours(
                hours.time_zone, tuple(hours.days), hours.start_hour, hours.end_hour
            )
            if hours is not None
            else None
        )
        try:
            workspace = await anomaly_service.set_business_hours(
                info.context.services, info.context.operator, value
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        stored = anomaly_service.BusinessHours.from_json(workspace.business_hours)
        return SetBusinessHoursSuccess(
            business_hours=BusinessHoursType.from_value(stored) if stored else None
        )
