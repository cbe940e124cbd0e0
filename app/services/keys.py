"""The API-key lifecycle: create, update, enable/disable, revoke with grace, rotate, restrict,
delete. Each change is one transaction with its audit entry, and reports the affected keys to
the change feed once committed so no cache keeps answering with the old state."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tortoise.expressions import Q

from app.db import transaction
from app.errors import InvalidState, KeyLimitReached, NotFound, ValidationFailed
from app.net import normalise_allowed_ips
from app.permissions import KEY_CREATE, KEY_DELETE, KEY_UPDATE, KEY_VIEW
from app.services import Services, audit
from app.services.environments import get_environment
from app.services.principal import Principal
from app.services.roles import get_role
from app.services.validation import (
    clean_description,
    clean_expiry,
    clean_name,
    clean_permissions,
    require_public_id,
)
from app.services.workspaces import PLAN_KEY_LIMITS, active_key_count
from app.tokens import KeyType, display_prefix, hash_secret, is_public_id, mint_token, new_public_id
from models import ApiKey, Environment, KeyKind, KeyStatus, Role, Workspace

GRACE_MINUTES = (0, 15, 30, 60, 240, 720, 1440)
MAX_PAGE = 100
DEFAULT_PAGE = 50
MAX_SEARCH = 100


class _Unchanged:
    """Marks an update field the caller did not send (distinct from an explicit null)."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()


@dataclass
class NewKey:
    environment_id: str
    name: str
    type: KeyKind = KeyKind.SERVER
    permissions: Sequence[str] = ()
    role_id: str | None = None
    allowed_ips: Sequence[str] = ()
    expires_at: datetime | None = None
    description: str | None = None


@dataclass
class KeyChanges:
    name: Any = UNCHANGED
    permissions: Any = UNCHANGED
    role_id: Any = UNCHANGED
    expires_at: Any = UNCHANGED
    description: Any = UNCHANGED


@dataclass(frozen=True)
class MintedKey:
    key: ApiKey
    secret: str


@dataclass(frozen=True)
class Rotation:
    old_key: ApiKey
    new_key: ApiKey
    secret: str


@dataclass(frozen=True)
class KeyPage:
    keys: list[ApiKey]
    total: int
    has_next: bool
    cursors: list[str] = field(default_factory=list)


# The largest row ID of each cursor's table (INTEGER or BIGINT): a cursor holding a larger
# number was never issued, and the database would refuse to compare with it.
MAX_ROW_ID = {"key": 2**31 - 1, "evt": 2**31 - 1, "den": 2**63 - 1}


def encode_cursor(kind: str, row_id: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    """The row ID inside an opaque cursor; ValidationFailed naming it when it is not ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.urlsafe_b64decode(padded.encode()).decode()
        prefix, _, number = text.partition(":")
        if prefix != kind or not (number.isascii() and number.isdigit()):
            raise ValueError(cursor)
        row_id = int(number)
        if row_id > MAX_ROW_ID[kind]:
            raise ValueError(cursor)
        return row_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        shown = cursor if len(cursor) <= 64 else cursor[:64] + "…"
        raise ValidationFailed(f"invalid cursor {shown!r}", field="after") from None


def check_page_size(first: int | None) -> int:
    """The page size asked for; an explicit null is the default page (the contract's
    `first: Int = 50`)."""
    if first is None:
        return DEFAULT_PAGE
    if first < 0 or first > MAX_PAGE:
        raise ValidationFailed(f"first={first} is out of range; use 0 to {MAX_PAGE}", "first")
    return first


def check_grace(minutes: int) -> int:
    if minutes not in GRACE_MINUTES:
        allowed = ", ".join(str(m) for m in GRACE_MINUTES)
        raise ValidationFailed(
            f"graceMinutes={minutes} is not allowed; use one of {allowed}", field="graceMinutes"
        )
    return minutes


async def get_key(principal: Principal, key_id: str) -> ApiKey | None:
    """The caller's key with this public ID, or None (unknown, malformed, another workspace's)."""
    principal.require(KEY_VIEW)
    if not is_public_id(key_id, "key"):
        return None
    return await ApiKey.get_or_none(public_id=key_id, workspace_id=principal.workspace_id)


async def _key_for_change(principal: Principal, key_id: str) -> ApiKey:
    require_public_id(key_id, "key", "key")
    key = (
        await ApiKey.filter(public_id=key_id, workspace_id=principal.workspace_id)
        .select_for_update()
        .first()
    )
    if key is None:
        raise NotFound(f"key {key_id!r} not found")
    return key


def rotation_due_at(
    created_at: datetime, key_type: KeyKind, status: KeyStatus, policy_days: int
) -> datetime | None:
    """When a key should be rotated under its environment's policy; None for keys that are
    never rotated (client-side IDs) or already revoked."""
    if key_type == KeyKind.CLIENT_SIDE or status == KeyStatus.REVOKED:
        return None
    return created_at + timedelta(days=policy_days)


async def _rotation_due_filter(principal: Principal, now: datetime) -> Q:
    """Keys past their environment's rotation policy, as one portable condition."""
    environments = await Environment.filter(workspace_id=principal.workspace_id)
    due = Q(id=-1)  # matches nothing when the workspace has no environments
    for env in environments:
        cutoff = now - timedelta(days=env.rotation_policy_days)
        due |= Q(environment_id=env.id, created_at__lte=cutoff)
    return due & ~Q(status=KeyStatus.REVOKED) & ~Q(type=KeyKind.CLIENT_SIDE)


async def list_keys(
    principal: Principal,
    *,
    environment_id: str | None,
    status: KeyStatus | None,
    key_type: KeyKind | None,
    search: str | None,
    first: int | None,
    after: str | None,
    rotation_due: bool | None = None,
    now: datetime | None = None,
) -> KeyPage:
    """A page of the workspace's keys, newest first, with the filtered total."""
    principal.require(KEY_VIEW)
    first = check_page_size(first)
    query = ApiKey.filter(workspace_id=principal.workspace_id)
    if rotation_due is not None:
        if now is None:
            raise ValueError("rotation_due needs now")
        due = await _rotation_due_filter(principal, now)
        query = query.filter(due) if rotation_due else query.exclude(due)
    if environment_id is not None:
        environment = await get_environment(principal, environment_id)
        query = query.filter(environment_id=environment.id)
    if status is not None:
        query = query.filter(status=status)
    if key_type is not None:
        query = query.filter(type=key_type)
    if search:
        if len(search) > MAX_SEARCH:
            raise ValidationFailed(
                f"search is {len(search)} characters; the limit is {MAX_SEARCH}", "search"
            )
        term = search.strip()
        query = query.filter(
            Q(name__icontains=term) | Q(prefix__startswith=term) | Q(public_id=term)
        )
    total = await query.count()
    if after is not None:
        query = query.filter(id__lt=decode_cursor("key", after))
    rows = await query.order_by("-id").limit(first + 1)
    has_next = len(rows) > first
    rows = rows[:first]
    return KeyPage(
        keys=rows,
        total=total,
        has_next=has_next,
        cursors=[encode_cursor("key", row.id) for row in rows],
    )


async def _check_plan_limit(workspace: Workspace) -> None:
    limit = PLAN_KEY_LIMITS[workspace.plan]
    if limit is None:
        return
    count = await active_key_count(workspace.id)
    if count >= limit:
        raise KeyLimitReached(
            f"plan {workspace.plan.value} allows {limit} active keys and the workspace has "
            f"{count}; revoke a key or upgrade the plan",
            limit=limit,
        )


async def _resolve_role(principal: Principal, role_id: str | None) -> Role | None:
    return None if role_id is None else await get_role(principal, role_id)


def _clean_ips(values: Sequence[str]) -> list[str]:
    try:
        return normalise_allowed_ips(values)
    except ValueError as exc:
        raise ValidationFailed(str(exc), field="allowedIps") from None


def _mint_row(
    workspace: Workspace,
    environment_id: int,
    *,
    name: str,
    key_type: KeyKind,
    permissions: list[str],
    role_id: int | None,
    allowed_ips: list[str],
    expires_at: datetime | None,
    description: str | None,
    now: datetime,
    status: KeyStatus = KeyStatus.ENABLED,
    rotated_from: str | None = None,
) -> tuple[ApiKey, str]:
    secret = mint_token(workspace.key_prefix, KeyType(key_type.value))
    key = ApiKey(
        public_id=new_public_id("key"),
        workspace_id=workspace.id,
        environment_id=environment_id,
        name=name,
        description=description,
        type=key_type,
        secret_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        status=status,
        permissions=permissions,
        role_id=role_id,
        allowed_ips=allowed_ips,
        expires_at=expires_at,
        rotated_from=rotated_from,
        created_at=now,
        updated_at=now,
    )
    return key, secret


async def create_key(services: Services, principal: Principal, request: NewKey) -> MintedKey:
    """Mint a SERVER or MOBILE key; the secret is returned here and never again."""
    principal.require(KEY_CREATE)
    if request.type == KeyKind.CLIENT_SIDE:
        raise ValidationFailed(
            "type CLIENT_SIDE cannot be created: every environment has exactly one client-side "
            "ID, minted with it",
            field="type",
        )
    now = services.clock.now()
    name = clean_name(request.name)
    description = clean_description(request.description)
    permissions = clean_permissions(request.permissions)
    allowed_ips = _clean_ips(request.allowed_ips)
    expires_at = clean_expiry(request.expires_at, now)
    async with transaction():
        # Locking the workspace row serialises concurrent creates against the plan limit.
        workspace = await Workspace.select_for_update().get(id=principal.workspace_id)
        environment = await get_environment(principal, request.environment_id)
        role = await _resolve_role(principal, request.role_id)
        await _check_plan_limit(workspace)
        key, secret = _mint_row(
            workspace,
            environment.id,
            name=name,
            key_type=request.type,
            permissions=permissions,
            role_id=role.id if role else None,
            allowed_ips=allowed_ips,
            expires_at=expires_at,
            description=description,
            now=now,
        )
        await key.save()
        await audit.record(
            principal,
            "key.create",
            now,
            key_id=key.public_id,
            name=name,
            type=request.type.value,
            environment=environment.public_id,
        )
    return MintedKey(key=key, secret=secret)


async def update_key(
    services: Services, principal: Principal, key_id: str, changes: KeyChanges
) -> ApiKey:
    principal.require(KEY_UPDATE)
    now = services.clock.now()
    async with transaction():
        key = await _key_for_change(principal, key_id)
        changed: dict[str, Any] = {}
        if changes.name is not UNCHANGED:
            if changes.name is None:
                raise ValidationFailed("name must not be null", field="name")
            key.name = changed["name"] = clean_name(changes.name)
        if changes.description is not UNCHANGED:
            key.description = clean_description(changes.description)  # type: ignore[assignment]
            changed["description"] = "updated"
        if changes.permissions is not UNCHANGED:
            key.permissions = changed["permissions"] = clean_permissions(changes.permissions or [])
        if changes.role_id is not UNCHANGED:
            role = await _resolve_role(principal, changes.role_id)
            key.role_id = role.id if role else None
            changed["role"] = role.public_id if role else None
        if changes.expires_at is not UNCHANGED:
            if key.type == KeyKind.CLIENT_SIDE and changes.expires_at is not None:
                raise ValidationFailed(
                    "a client-side ID cannot expire: it lives as long as its environment",
                    field="expiresAt",
                )
            key.expires_at = clean_expiry(changes.expires_at, now)
            changed["expiresAt"] = key.expires_at
        key.updated_at = now
        await key.save()
        await audit.record(principal, "key.update", now, key_id=key.public_id, **changed)
    await services.changes.keys_changed([key.secret_hash])
    return key


async def set_status(
    services: Services, principal: Principal, key_id: str, status: KeyStatus
) -> ApiKey:
    principal.require(KEY_UPDATE)
    if status == KeyStatus.REVOKED:
        raise ValidationFailed(
            "status REVOKED cannot be set here; use the revoke mutation", field="status"
        )
    now = services.clock.now()
    async with transaction():
        key = await _key_for_change(principal, key_id)
        if key.status == KeyStatus.REVOKED:
            raise InvalidState(f"key {key_id!r} is revoked; a revoked key cannot be re-enabled")
        previous = key.status
        key.status = status
        key.updated_at = now
        await key.save(update_fields=["status", "updated_at"])
        await audit.record(
            principal,
            "key.enable" if status == KeyStatus.ENABLED else "key.disable",
            now,
            key_id=key.public_id,
            previous=previous.value,
        )
    await services.changes.keys_changed([key.secret_hash])
    return key


def _revoke_in_place(key: ApiKey, grace_minutes: int, now: datetime) -> None:
    if key.status == KeyStatus.REVOKED:
        raise InvalidState(f"key {key.public_id!r} is already revoked")
    if key.type == KeyKind.CLIENT_SIDE:
        raise InvalidState(
            f"key {key.public_id!r} is a client-side ID: it lives as long as its environment"
        )
    # A grace period keeps an enabled key working; it never brings a disabled one back.
    key.grace_ends_at = _grace_end(now, grace_minutes) if key.status == KeyStatus.ENABLED else None
    key.status = KeyStatus.REVOKED
    key.revoked_at = now
    key.updated_at = now


def _grace_end(now: datetime, grace_minutes: int) -> datetime | None:
    """When a grace of this many minutes from now ends (None for no grace)."""
    return now + timedelta(minutes=grace_minutes) if grace_minutes else None


def _in_grace(key: ApiKey, now: datetime) -> bool:
    return key.grace_ends_at is not None and key.grace_ends_at > now


def _shorten_grace(key: ApiKey, grace_minutes: int, now: datetime) -> None:
    """Revoking a key still in its grace period ends the grace sooner (grace 0: at once), as
    an incident needs after a rotation with a long grace; it never lengthens it. The key is
    in its grace (`_in_grace`)."""
    assert key.grace_ends_at is not None
    ends = _grace_end(now, grace_minutes)
    if ends is not None and ends >= key.grace_ends_at:
        raise InvalidState(
            f"key {key.public_id!r} is already revoked; its grace period ends at "
            f"{key.grace_ends_at.isoformat()}, and a revoke can only shorten it"
        )
    key.grace_ends_at = ends
    key.updated_at = now


async def revoke(
    services: Services, principal: Principal, key_id: str, grace_minutes: int
) -> ApiKey:
    principal.require(KEY_DELETE)
    check_grace(grace_minutes)
    now = services.clock.now()
    async with transaction():
        key = await _key_for_change(principal, key_id)
        if key.status == KeyStatus.REVOKED and _in_grace(key, now):
            _shorten_grace(key, grace_minutes, now)
        else:
            _revoke_in_place(key, grace_minutes, now)
        await key.save()
        await audit.record(
            principal, "key.revoke", now, key_id=key.public_id, graceMinutes=grace_minutes
        )
    await services.changes.keys_changed([key.secret_hash])
    return key


async def _rotate_in_place(
    workspace: Workspace, key: ApiKey, grace_minutes: int, now: datetime
) -> Rotation:
    # A disabled key's replacement stays disabled: rotation must not re-enable access.
    new_status = KeyStatus.DISABLED if key.status == KeyStatus.DISABLED else KeyStatus.ENABLED
    _revoke_in_place(key, grace_minutes, now)
    new_key, secret = _mint_row(
        workspace,
        key.environment_id,
        name=key.name,
        key_type=key.type,
        permissions=list(key.permissions),
        role_id=key.role_id,
        allowed_ips=list(key.allowed_ips),
        expires_at=key.expires_at,
        description=key.description,
        now=now,
        status=new_status,
        rotated_from=key.public_id,
    )
    await new_key.save()
    key.rotated_to = new_key.public_id
    await key.save()
    return Rotation(old_key=key, new_key=new_key, secret=secret)


async def rotate_key(
    services: Services, principal: Principal, key_id: str, grace_minutes: int
) -> Rotation:
    """Replace a key by a new one with the same settings; the old one is revoked with grace.
    Rotation does not count against the plan limit."""
    principal.require(KEY_CREATE)
    principal.require(KEY_DELETE)
    check_grace(grace_minutes)
    now = services.clock.now()
    async with transaction():
        workspace = await Workspace.get(id=principal.workspace_id)
        key = await _key_for_change(principal, key_id)
        rotation = await _rotate_in_place(workspace, key, grace_minutes, now)
        await _audit_rotation(principal, rotation, grace_minutes, now)
    await services.changes.keys_changed([key.secret_hash])
    return rotation


async def _audit_rotation(
    principal: Principal, rotation: Rotation, grace_minutes: int, now: datetime, **extra: Any
) -> None:
    """A rotation's entries: one on the old key, one on the key that replaces it (so the new
    key's own history starts with where it came from)."""
    old, new = rotation.old_key.public_id, rotation.new_key.public_id
    await audit.record(
        principal, "key.rotate", now, key_id=old, newKey=new, graceMinutes=grace_minutes, **extra
    )
    await audit.record(principal, "key.rotate", now, key_id=new, rotatedFrom=old, **extra)


async def rotate_all(
    services: Services, principal: Principal, environment_id: str, grace_minutes: int
) -> list[Rotation]:
    """Rotate every SERVER key of the environment that is not revoked, all or nothing."""
    principal.require(KEY_CREATE)
    principal.require(KEY_DELETE)
    check_grace(grace_minutes)
    now = services.clock.now()
    async with transaction():
        workspace = await Workspace.get(id=principal.workspace_id)
        environment: Environment = await get_environment(principal, environment_id)
        keys = (
            await ApiKey.filter(environment_id=environment.id, type=KeyKind.SERVER)
            .exclude(status=KeyStatus.REVOKED)
            .order_by("id")
            .select_for_update()
        )
        rotations = []
        for key in keys:
            rotations.append(await _rotate_in_place(workspace, key, grace_minutes, now))
        for rotation in rotations:
            await _audit_rotation(principal, rotation, grace_minutes, now, batch="rotateAll")
        # Old secrets still in a grace period (an earlier rotation's) stop working no later
        # than the secrets rotated now: after a leak, rotateAll(grace 0) leaves none valid.
        shortened = await _shorten_graces(principal, environment, grace_minutes, now)
        if not rotations:  # every mutation leaves an entry, even one that found nothing to do
            await audit.record(
                principal,
                "key.rotate_all",
                now,
                environment=environment.public_id,
                rotated=0,
                graceMinutes=grace_minutes,
            )
    await services.changes.keys_changed(
        [r.old_key.secret_hash for r in rotations] + [k.secret_hash for k in shortened]
    )
    return rotations


async def _shorten_graces(
    principal: Principal, environment: Environment, grace_minutes: int, now: datetime
) -> list[ApiKey]:
    """Old keys of the environment whose grace ends later than a grace of `grace_minutes`
    would: theirs now ends then."""
    keys = (
        await ApiKey.filter(
            environment_id=environment.id,
            status=KeyStatus.REVOKED,
            grace_ends_at__gt=_grace_end(now, grace_minutes) or now,
        )
        .order_by("id")
        .select_for_update()
    )
    for key in keys:
        _shorten_grace(key, grace_minutes, now)
        await key.save(update_fields=["grace_ends_at", "updated_at"])
        await audit.record(
            principal,
            "key.revoke",
            now,
            key_id=key.public_id,
            graceMinutes=grace_minutes,
            batch="rotateAll",
        )
    return keys


async def set_allowed_ips(
    services: Services, principal: Principal, key_id: str, ips: Sequence[str]
) -> ApiKey:
    principal.require(KEY_UPDATE)
    cleaned = _clean_ips(ips)
    now = services.clock.now()
    async with transaction():
        key = await _key_for_change(principal, key_id)
        key.allowed_ips = cleaned
        key.updated_at = now
        await key.save(update_fields=["allowed_ips", "updated_at"])
        await audit.record(principal, "key.set_allowed_ips", now, key_id=key.public_id, ips=cleaned)
    await services.changes.keys_changed([key.secret_hash])
    return key


async def delete_key(services: Services, principal: Principal, key_id: str) -> str:
    """Delete a key for good: its token becomes unknown. Usage and audit history remain."""
    principal.require(KEY_DELETE)
    now = services.clock.now()
    async with transaction():
        key = await _key_for_change(principal, key_id)
        if key.type == KeyKind.CLIENT_SIDE:
            raise InvalidState(
                f"key {key_id!r} is a client-side ID: it lives as long as its environment"
            )
        await key.delete()
        await audit.record(principal, "key.delete", now, key_id=key.public_id, name=key.name)
    await services.changes.keys_changed([key.secret_hash])
    return key.public_id
