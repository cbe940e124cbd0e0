"""Permission strings (`pdf.generate`, `pdf.*`) and operator permissions. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

MAX_PERMISSIONS = 100
MAX_PERMISSION_LENGTH = 128
# Matched whole (`fullmatch`): with `$`, "pdf.read\n" matched too.
_PERMISSION_RE = re.compile(r"[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*(\.\*)?|\*")

# What a management token or member may do in its workspace.
KEY_VIEW = "api.key.view"
KEY_CREATE = "api.key.create"
KEY_UPDATE = "api.key.update"
KEY_DELETE = "api.key.delete"
TOKEN_CREATE = "api.token.create"
MEMBER_MANAGE = "member.manage"
# Granting, changing or removing the OWNER role (besides member.manage): owners only, so an
# ADMIN cannot make itself OWNER or demote the owners.
MEMBER_OWNER = "member.owner"
OPERATOR_PERMISSIONS = (
    KEY_VIEW,
    KEY_CREATE,
    KEY_UPDATE,
    KEY_DELETE,
    TOKEN_CREATE,
    MEMBER_MANAGE,
    MEMBER_OWNER,
)


def validate_permission(value: str) -> str:
    """Return the permission if well formed; ValueError naming it otherwise."""
    if len(value) > MAX_PERMISSION_LENGTH:
        raise ValueError(
            f"permission {value[:40]!r}… is longer than {MAX_PERMISSION_LENGTH} characters"
        )
    if not _PERMISSION_RE.fullmatch(value):
        raise ValueError(
            f"invalid permission {value!r}: use dotted lowercase segments "
            "(a-z, 0-9, _ and -), optionally ending in .* (e.g. pdf.generate, pdf.*)"
        )
    return value


def is_permission(value: str) -> bool:
    """Whether a text is a well-formed permission, one a key could hold."""
    return len(value) <= MAX_PERMISSION_LENGTH and _PERMISSION_RE.fullmatch(value) is not None


def validate_permissions(values: Sequence[str]) -> list[str]:
    """Validate a permission list; duplicates are dropped, order kept."""
    if len(values) > MAX_PERMISSIONS:
        raise ValueError(f"too many permissions ({len(values)}); the limit is {MAX_PERMISSIONS}")
    result: list[str] = []
    for value in values:
        validate_permission(value)
        if value not in result:
            result.append(value)
    return result


def grants(held: str, required: str) -> bool:
    """True when holding `held` grants `required`: equal, or a `family.*` covering it."""
    if held == required or held == "*":
        return True
    if held.endswith(".*"):
        family = held[:-1]  # keeps the trailing dot: "pdf." grants "pdf.generate", not "pdfx"
        return required.startswith(family) and len(required) > len(family)
    return False


def missing_permissions(held: Iterable[str], required: Iterable[str]) -> list[str]:
    """The required permissions that nothing held grants, in the order asked."""
    held_list = list(held)
    exact = set(held_list)
    families = [h for h in held_list if h.endswith("*")]
    return [r for r in required if r not in exact and not any(grants(f, r) for f in families)]
