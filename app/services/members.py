"""Team members: people who log in to a workspace's dashboard, with sessions they can end."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from tortoise.exceptions import IntegrityError

from app.db import transaction
from app.errors import InvalidCredentials, InvalidState, NotFound, ValidationFailed
from app.passwords import (
    MAX_PASSWORD,
    MIN_PASSWORD,
    check_password,
    equalise_timing,
    hash_password,
)
from app.permissions import KEY_VIEW, MEMBER_MANAGE, MEMBER_OWNER
from app.services import Services, audit
from app.services.principal import Principal
from app.services.validation import clean_name, require_public_id
from app.tokens import (
    INVITE_TAG,
    SESSION_TAG,
    hash_secret,
    is_invite_token,
    mint_bearer,
    new_public_id,
)
from models import AuditEvent, Member, MemberRole, Session, Workspace

SESSION_LIFETIME = timedelta(hours=12)
INVITE_LIFETIME = timedelta(days=7)
GENERIC_INVITE_FAILURE = "Invalid or expired invitation"
_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{1,63}$")
GENERIC_LOGIN_FAILURE = "Invalid email or password"


@dataclass(frozen=True)
class Invited:
    member: Member
    token: str  # shown once, to be handed to the invitee; only its hash is stored
    expires_at: datetime


@dataclass(frozen=True)
class LoggedIn:
    token: str
    expires_at: datetime
    member: Member


def clean_email(value: str) -> str:
    email = value.strip().lower()
    if len(email) > 254 or not _EMAIL_RE.match(email):
        shown = value if len(value) <= 80 else value[:80] + "…"
        raise ValidationFailed(f"{shown!r} is not an email address", field="email")
    return email


def check_new_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValidationFailed(
            f"password must be at least {MIN_PASSWORD} characters", field="password"
        )
    if len(password) > MAX_PASSWORD:
        raise ValidationFailed(f"password must be at most {MAX_PASSWORD} characters", "password")
    return password


async def list_members(principal: Principal) -> list[Member]:
    principal.require(KEY_VIEW)
    return await Member.filter(workspace_id=principal.workspace_id).order_by("id")


async def login(email: str, password: str, now: datetime) -> LoggedIn:
    """A session for the member with this email and password. Wrong email and wrong password
    fail alike (same message, same work), so the answer does not reveal who is a member."""
    try:
        address = clean_email(email)
    except ValidationFailed:
        equalise_timing(password)
        raise InvalidCredentials(GENERIC_LOGIN_FAILURE) from None
    member = await Member.get_or_none(email=address)
    ok, new_hash = check_password(password, member.password_hash if member else None)
    if member is not None and ok:
        token = mint_bearer(SESSION_TAG)
        expires_at = now + SESSION_LIFETIME
        async with transaction():
            if new_hash is not None:
                member.password_hash = new_hash
                await member.save(update_fields=["password_hash"])
            await Session.create(
                member=member, token_hash=hash_secret(token), created_at=now, expires_at=expires_at
            )
            await _member_audit(member, "member.login", now)
        return LoggedIn(token=token, expires_at=expires_at, member=member)
    raise InvalidCredentials(GENERIC_LOGIN_FAILURE)


async def _member_audit(member: Member, action: str, now: datetime) -> None:
    """An audit entry for something a member did before (or without) a Principal: logging in
    or accepting an invitation. A failed login writes nothing: that extra write would make a
    wrong password on a real email slower than an unknown email (failures are rate-limited)."""
    await AuditEvent.create(
        workspace_id=member.workspace_id,
        at=now,
        action=action,
        actor=f"member:{member.email}",
        detail=json.dumps({"member": member.public_id}),
    )


async def logout(services: Services, principal: Principal) -> None:
    """End the calling session (a management token has no session to end)."""
    if principal.session_id is None:
        raise InvalidState("logout ends a member's session; this request used a management token")
    now = services.clock.now()
    async with transaction():
        await Session.filter(id=principal.session_id).update(ended_at=now)
        await audit.record(principal, "member.logout", now)


async def _lock_members(principal: Principal) -> None:
    """Serialise changes to a workspace's owners (PostgreSQL: the workspace row's lock, held to
    the end of the transaction). Without it two owners demoting or removing each other at once
    both counted two owners, and both went through: the workspace was left with none."""
    await Workspace.select_for_update().get(id=principal.workspace_id)


async def _member(principal: Principal, member_id: str) -> Member:
    require_public_id(member_id, "mem", "member")
    member = await Member.get_or_none(public_id=member_id, workspace_id=principal.workspace_id)
    if member is None:
        raise NotFound(f"member {member_id!r} not found")
    return member


async def _owners(workspace_id: int) -> int:
    """Owners who can log in: an invitation not yet accepted (or lapsed) owns nothing."""
    return await Member.filter(
        workspace_id=workspace_id, role=MemberRole.OWNER, password_hash__isnull=False
    ).count()


async def _last_owner(member: Member) -> bool:
    """Whether this member is the workspace's only owner who can log in."""
    return (
        member.role == MemberRole.OWNER
        and member.password_hash is not None
        and await _owners(member.workspace_id) <= 1
    )


def _require_owner_rights(principal: Principal, *roles: MemberRole) -> None:
    """Granting, changing or taking away the OWNER role needs member.owner (owners hold it,
    admins do not)."""
    if MemberRole.OWNER in roles:
        principal.require(MEMBER_OWNER)


async def invite_member(
    services: Services, principal: Principal, email: str, role: MemberRole
) -> Invited:
    """Add a member without a password and mint their one-time invitation token (valid for
    INVITE_LIFETIME). Inviting a member who has not accepted yet issues a fresh token and
    voids the old one; a member who has a password is refused."""
    principal.require(MEMBER_MANAGE)
    address = clean_email(email)
    now = services.clock.now()
    token = mint_bearer(INVITE_TAG)
    expires_at = now + INVITE_LIFETIME
    async with transaction():
        member = await Member.get_or_none(email=address)
        # login(email, password) names no workspace, so an email belongs to one member only.
        if member is not None and (
            member.workspace_id != principal.workspace_id or member.password_hash is not None
        ):
            raise ValidationFailed(f"{address!r} is already a member", field="email")
        _require_owner_rights(principal, role, *([member.role] if member else []))
        if member is None:
            try:
                member = await Member.create(
                    public_id=new_public_id("mem"),
                    workspace_id=principal.workspace_id,
                    email=address,
                    role=role,
                    created_at=now,
                    invite_hash=hash_secret(token),
                    invite_expires_at=expires_at,
                )
            except IntegrityError:  # the same email invited elsewhere at the same moment
                raise ValidationFailed(f"{address!r} is already a member", field="email") from None
        else:
            member.role = role
            member.invite_hash = hash_secret(token)
            member.invite_expires_at = expires_at
            await member.save(update_fields=["role", "invite_hash", "invite_expires_at"])
        await audit.record(
            principal, "member.invite", now, member=member.public_id, email=address, role=role.value
        )
    return Invited(member=member, token=token, expires_at=expires_at)


async def accept_invite(token: str, password: str, name: str | None, now: datetime) -> LoggedIn:
    """Set the invited member's password (and name) and log them in. The token works once;
    an unknown, used or lapsed one gets one generic answer."""
    if not is_invite_token(token):
        raise InvalidCredentials(GENERIC_INVITE_FAILURE)
    check_new_password(password)
    display_name = clean_name(name, "name") if name is not None else None
    async with transaction():
        member = await Member.filter(invite_hash=hash_secret(token)).select_for_update().first()
        if member is None or member.invite_expires_at is None or member.invite_expires_at <= now:
            raise InvalidCredentials(GENERIC_INVITE_FAILURE)
        member.password_hash = hash_password(password)
        member.invite_hash = None
        member.invite_expires_at = None
        fields = ["password_hash", "invite_hash", "invite_expires_at"]
        if display_name is not None:
            member.name = display_name
            fields.append("name")
        await member.save(update_fields=fields)
        session_token = mint_bearer(SESSION_TAG)
        expires_at = now + SESSION_LIFETIME
        await Session.create(
            member=member,
            token_hash=hash_secret(session_token),
            created_at=now,
            expires_at=expires_at,
        )
        await _member_audit(member, "member.accept_invite", now)
    return LoggedIn(token=session_token, expires_at=expires_at, member=member)


async def update_member(
    services: Services, principal: Principal, member_id: str, role: MemberRole
) -> Member:
    principal.require(MEMBER_MANAGE)
    now = services.clock.now()
    async with transaction():
        await _lock_members(principal)
        member = await _member(principal, member_id)
        _require_owner_rights(principal, member.role, role)
        if role != MemberRole.OWNER and await _last_owner(member):
            raise InvalidState("the workspace's last owner cannot be demoted")
        previous = member.role
        member.role = role
        await member.save(update_fields=["role"])
        await audit.record(
            principal,
            "member.update",
            now,
            member=member.public_id,
            role=role.value,
            previous=previous.value,
        )
    return member


async def remove_member(services: Services, principal: Principal, member_id: str) -> str:
    """Remove a member; their sessions end at once (sessions are checked on every request)."""
    principal.require(MEMBER_MANAGE)
    now = services.clock.now()
    async with transaction():
        await _lock_members(principal)
        member = await _member(principal, member_id)
        _require_owner_rights(principal, member.role)
        if await _last_owner(member):
            raise InvalidState("the workspace's last owner cannot be removed")
        await Session.filter(member_id=member.id).delete()
        await member.delete()
        await audit.record(
            principal, "member.remove", now, member=member.public_id, email=member.email
        )
    return member.public_id


async def set_owner(workspace: Workspace, email: str, password: str, now: datetime) -> Member:
    """Create or reset owner `email` with `password` (the CLI's bootstrap --email)."""
    address = clean_email(email)
    check_new_password(password)
    async with transaction():
        member = await Member.get_or_none(workspace_id=workspace.id, email=address)
        if member is None and await Member.exists(email=address):
            raise ValidationFailed(
                f"{address!r} is already a member of another workspace", field="email"
            )
        if member is None:
            try:
                member = await Member.create(
                    public_id=new_public_id("mem"),
                    workspace=workspace,
                    email=address,
                    role=MemberRole.OWNER,
                    password_hash=hash_password(password),
                    created_at=now,
                )
            except IntegrityError:  # invited into another workspace at the same moment
                raise ValidationFailed(
                    f"{address!r} is already a member of another workspace", field="email"
                ) from None
        else:
            member.role = MemberRole.OWNER
            member.password_hash = hash_password(password)
            member.invite_hash = None
            member.invite_expires_at = None
            await member.save(
                update_fields=["role", "password_hash", "invite_hash", "invite_expires_at"]
            )
            await Session.filter(member_id=member.id).update(ended_at=now)
    return member
