"""Roles: named permission sets a key can hold besides its direct permissions."""

from __future__ import annotations

from collections.abc import Sequence

from app.db import transaction
from app.errors import NotFound, ValidationFailed
from app.permissions import KEY_CREATE, KEY_VIEW
from app.services import Services, audit
from app.services.principal import Principal
from app.services.validation import clean_name, clean_permissions, require_public_id
from app.tokens import new_public_id
from models import Role, Workspace


async def list_roles(principal: Principal) -> list[Role]:
    principal.require(KEY_VIEW)
    return await Role.filter(workspace_id=principal.workspace_id).order_by("id")


async def get_role(principal: Principal, role_id: str) -> Role:
    require_public_id(role_id, "role", "role")
    role = await Role.get_or_none(public_id=role_id, workspace_id=principal.workspace_id)
    if role is None:
        raise NotFound(f"role {role_id!r} not found")
    return role


async def create_role(
    services: Services, principal: Principal, name: str, permissions: Sequence[str]
) -> Role:
    principal.require(KEY_CREATE)
    name = clean_name(name, "role name", limit=64)
    cleaned = clean_permissions(permissions)
    now = services.clock.now()
    async with transaction():
        # Locking the workspace row serialises concurrent creates of one name: without it two
        # could both pass the check and the second insert fail on the unique index.
        await Workspace.select_for_update().get(id=principal.workspace_id)
        if await Role.exists(workspace_id=principal.workspace_id, name=name):
            raise ValidationFailed(f"role {name!r} already exists", field="name")
        role = await Role.create(
            public_id=new_public_id("role"),
            workspace_id=principal.workspace_id,
            name=name,
            permissions=cleaned,
        )
        await audit.record(
            principal, "role.create", now, role=role.public_id, name=name, permissions=cleaned
        )
    return role
