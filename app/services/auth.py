"""Who is calling the management API: bearer tokens become principals; failures are limited."""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime

from app.permissions import (
    KEY_CREATE,
    KEY_DELETE,
    KEY_UPDATE,
    KEY_VIEW,
    MEMBER_OWNER,
    OPERATOR_PERMISSIONS,
)
from app.services.principal import Principal
from app.tokens import MANAGEMENT_TAG, SESSION_TAG, hash_secret, parse_bearer
from models import ManagementToken, Member, MemberRole, Session

MEMBER_PERMISSIONS: dict[MemberRole, frozenset[str]] = {
    MemberRole.OWNER: frozenset(OPERATOR_PERMISSIONS),
    MemberRole.ADMIN: frozenset(OPERATOR_PERMISSIONS) - {MEMBER_OWNER},
    MemberRole.DEVELOPER: frozenset({KEY_VIEW, KEY_CREATE, KEY_UPDATE, KEY_DELETE}),
    MemberRole.VIEWER: frozenset({KEY_VIEW}),
}


async def authenticate(token: str, now: datetime) -> Principal | None:
    """The principal a bearer token stands for, or None. A malformed token is refused without
    a query; a well-formed one costs one indexed lookup by its hash."""
    tag = parse_bearer(token)
    if tag is None:
        return None
    token_hash = hash_secret(token)
    if tag == MANAGEMENT_TAG:
        record = await ManagementToken.get_or_none(token_hash=token_hash).select_related(
            "workspace"
        )
        if record is None or record.revoked_at is not None:
            return None
        permissions = frozenset(record.permissions)
        if record.created_by_member_id is not None:
            # A member's token holds at most what the member's role holds now: removing or
            # demoting the member takes it back from their tokens too.
            creator = await Member.get_or_none(
                id=record.created_by_member_id, workspace_id=record.workspace_id
            )
            if creator is None:
                return None
            permissions &= MEMBER_PERMISSIONS[creator.role]
        return Principal(
            workspace_id=record.workspace_id,
            workspace_public_id=record.workspace.public_id,
            actor=f"token:{record.name} ({record.public_id})",
            permissions=permissions,
            token_id=record.id,
        )
    if tag == SESSION_TAG:
        session = await Session.get_or_none(token_hash=token_hash).select_related(
            "member__workspace"
        )
        if session is None or session.ended_at is not None or session.expires_at <= now:
            return None
        member = session.member
        return Principal(
            workspace_id=member.workspace_id,
            workspace_public_id=member.workspace.public_id,
            actor=f"member:{member.email}",
            permissions=MEMBER_PERMISSIONS[member.role],
            session_id=session.id,
            member_id=member.id,
        )
    return None


class FailureLimiter:
    """Counts failed authentications per client IP in a sliding window (per process).

    Bounded: at most `max_tracked` IPs are remembered; the oldest is forgotten first.
    """

    def __init__(self, limit: int, window_seconds: float, max_tracked: int = 100_000) -> None:
        self.limit = limit
        self.window = window_seconds
        self.max_tracked = max_tracked
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str, now: float) -> deque[float] | None:
        stamps = self._failures.get(ip)
        if stamps is None:
            return None
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if not stamps:
            del self._failures[ip]
            return None
        return stamps

    def blocked(self, ip: str, now: float | None = None) -> bool:
        """True when `ip` has used up its failures for the window."""
        now = time.monotonic() if now is None else now
        stamps = self._recent(ip, now)
        return stamps is not None and len(stamps) >= self.limit

    def record_failure(self, ip: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        stamps = self._recent(ip, now)
        if stamps is None:
            if len(self._failures) >= self.max_tracked:
                self._failures.pop(next(iter(self._failures)))
            stamps = self._failures[ip] = deque()
        stamps.append(now)
