"""The audit log."""

from __future__ import annotations

import strawberry

from app.permissions import KEY_VIEW
from app.services import audit as audit_service
from app.services.keys import check_page_size, decode_cursor, encode_cursor
from resolvers.context import Info
from resolvers.types import AuditConnection, AuditEdge, AuditEventType, PageInfo


@strawberry.type
class AuditQueries:
    @strawberry.field(description="Who did what, newest first.")
    async def audit_log(
        self,
        info: Info,
        key_id: strawberry.ID | None = None,
        first: int | None = 50,
        after: str | None = None,
    ) -> AuditConnection:
        principal = info.context.operator
        principal.require(KEY_VIEW)
        first = check_page_size(first)
        before = decode_cursor("evt", after) if after is not None else None
        events, total = await audit_service.list_events(
            principal, str(key_id) if key_id is not None else None, first + 1, before
        )
        edges = [
            AuditEdge(node=AuditEventType.from_model(e), cursor=encode_cursor("evt", e.id))
            for e in events[:first]
        ]
        return AuditConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=len(events) > first,
                end_cursor=edges[-1].cursor if edges else None,
            ),
            total_count=total,
        )
