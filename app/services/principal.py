"""Who is acting: a management token or a logged-in member, always inside one workspace."""

from __future__ import annotations

from dataclasses import dataclass

from app.errors import Forbidden


@dataclass(frozen=True)
class Principal:
    workspace_id: int
    workspace_public_id: str
    actor: str  # as written to the audit log: "token:ci (mt_…)" or "member:ann@example.com"
    permissions: frozenset[str]
    token_id: int | None = None
    session_id: int | None = None
    member_id: int | None = None

    def require(self, permission: str) -> None:
        """Raise Forbidden unless this principal holds `permission`."""
        if permission not in self.permissions:
            raise Forbidden(permission)
