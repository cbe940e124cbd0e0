"""Input checks shared by the services; every failure names the offending value."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from app.errors import ValidationFailed
from app.permissions import validate_permissions
from app.tokens import is_public_id, looks_like_secret

MAX_NAME = 100
MAX_DESCRIPTION = 1000


def clean_name(value: str, what: str = "name", limit: int = MAX_NAME) -> str:
    """Strip a display name and check it is 1..limit printable characters."""
    name = value.strip()
    if not name:
        raise ValidationFailed(f"{what} must not be empty", field=what)
    if len(name) > limit:
        raise ValidationFailed(
            f"{what} {name[:40]!r}… is {len(name)} characters; the limit is {limit}", field=what
        )
    if any(not ch.isprintable() for ch in name):
        raise ValidationFailed(f"{what} {name!r} contains control characters", field=what)
    if looks_like_secret(name):
        raise ValidationFailed(f"{what} must not contain an API key or token", field=what)
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


def clean_expiry(value: datetime | None, now: datetime) -> datetime | None:
    """An expiry must carry a time zone and lie in the future."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValidationFailed(
            f"expiresAt {value.isoformat()!r} has no time-zone offset", field="expiresAt"
        )
    if value <= now:
        raise ValidationFailed(
            f"expiresAt {value.isoformat()!r} is not in the future", field="expiresAt"
        )
    return value
