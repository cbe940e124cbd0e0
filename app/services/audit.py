"""The audit log: one entry per mutation, written in the mutation's own transaction."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from app.services.principal import Principal
from models import AuditEvent


async def record(
    principal: Principal,
    action: str,
    now: datetime,
    key_id: str | None = None,
    **detail: Any,
) -> None:
    """Append an audit entry. `detail` must never hold a secret: callers pass IDs and names."""
    await AuditEvent.create(
        workspace_id=principal.workspace_id,
        at=now,
        action=action,
        actor=principal.actor,
        key_id=key_id,
        detail=json.dumps(detail, sort_keys=True, default=str) if detail else None,
    )


async def list_events(
    principal: Principal, key_id: str | None, limit: int, before_id: int | None
) -> tuple[list[AuditEvent], int]:
    """A page of the workspace's audit log, newest first, and the filtered total."""
    query = AuditEvent.filter(workspace_id=principal.workspace_id)
    if key_id is not None:
        query = query.filter(key_id=key_id)
    total = await query.count()
    if before_id is not None:
        query = query.filter(id__lt=before_id)
    events = await query.order_by("-id").limit(limit)
    return events, total
