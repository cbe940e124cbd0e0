"""Input checks shared by the services; every failure names the offending value."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from app.errors import ValidationFailed
from app.permissions import validate_permissions
from app.tokens import is_public_id, looks_like_secret

MAX_NAME = 100
MAX_DESCRIPTION = 1000


def clean_name(
    value: str, what: str = "name", limit: int = MAX_NAME, field: str | None = None
) -> str:
    """Strip a display name and check it is 1..limit printable characters. `field`: the
    argument it came in (default `what`)."""
    what_field = field or what
    name = value.strip()
    if not name:
        raise ValidationFailed(f"{what} must not be empty", field=what_field)
    if len(name) > limit:
        raise ValidationFailed(
            f"{what} {name[:40]!r}… is {len(name)} characters; the limit is {limit}",
            field=what_field,
        )
    if any(not ch.isprintable() for ch in name):
        raise ValidationFailed(f"{what} {name!r} contains control characters", field=what_field)
    if looks_like_secret(name):
        raise ValidationFailed(f"{what} must not contain an API key or token", field=what_field)
    return name


def clean_description(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_DESCRIPTION:
        raise ValidationFailed(
            f"description is {len(value)} characters; the limit is {MAX_DESCRIPTION}",
            field="description",
        )
    return value


def clean_permissions(values: Sequence[str]) -> list[str]:
    try:
        return validate_permissions(values)
    except ValueError as exc:
        raise ValidationFailed(str(exc), field="permissions") from None


def require_public_id(value: str, kind: str, what: str) -> str:
    """Refuse a value that cannot be an ID of this kind, naming it."""
    if not is_public_id(value, kind):
        shown = value if len(value) <= 64 else value[:64] + "…"
        raise ValidationFailed(
            f"{shown!r} is not a valid {what} ID (expected {kind}_…)", field="id"
        )
    return value


EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)


def utc_moment(value: datetime, name: str) -> datetime:
    """A DateTime argument as UTC. It must carry a time-zone offset and lie from 1970-01-01
    to before 9999-01-01 (UTC): an offset can carry year 1 or 9999 out of what a datetime
    holds, and a day or an hour added to the end of the range would overflow."""
    if value.tzinfo is None:
        raise ValidationFailed(f"{name} {value.isoformat()!r} has no time-zone offset", name)
    try:
        moment = value.astimezone(UTC)
    except OverflowError:
        moment = None
    if moment is None or not EARLIEST <= moment < LATEST:
        raise ValidationFailed(
            f"{name} {value.isoformat()!r} is out of range; use a time from "
            f"{EARLIEST.isoformat()} to before {LATEST.isoformat()}",
            name,
        )
    return moment


def clean_expiry(value: datetime | None, now: datetime) -> datetime | None:
    """An expiry must carry a time zone and lie in the future (and before 9999)."""
    if value is None:
        return None
    value = utc_moment(value, "expiresAt")
    if value <= now:
        raise ValidationFailed(
            f"expiresAt {value.isoformat()!r} is not in the future", field="expiresAt"
        )
    return value
