"""Roles: named permission sets."""

from __future__ import annotations

from typing import Annotated

import strawberry

from app.errors import DomainError
from app.services import roles as role_service
from resolvers.context import Info
from resolvers.errors import ValidationFailedError, error_value
from resolvers.types import RoleType


@strawberry.type
class CreateRoleSuccess:
    role: RoleType


CreateRoleResult = Annotated[
    CreateRoleSuccess | ValidationFailedError, strawberry.union("CreateRoleResult")
]


@strawberry.type
class RoleQueries:
    @strawberry.field
    async def roles(self, info: Info) -> list[RoleType]:
        return [
            RoleType.from_model(r) for r in await role_service.list_roles(info.context.operator)
        ]


@strawberry.type
class RoleMutations:
    @strawberry.mutation
    async def create_role(self, info: Info, name: str, permissions: list[str]) -> CreateRoleResult:
        try:
            role = await role_service.create_role(
                info.context.services, info.context.operator, name, permissions
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return CreateRoleSuccess(role=RoleType.from_model(role))
