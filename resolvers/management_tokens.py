"""Management tokens for scripts and internal tools."""

from __future__ import annotations

from typing import Annotated

import strawberry

from app.errors import DomainError
from app.services import management_tokens as token_service
from resolvers.context import Info
from resolvers.errors import ValidationFailedError, error_value


@strawberry.type
class CreateManagementTokenSuccess:
    id: strawberry.ID
    name: str
    permissions: list[str]
    token: str = strawberry.field(description="The bearer token. Shown once, never again.")


CreateManagementTokenResult = Annotated[
    CreateManagementTokenSuccess | ValidationFailedError,
    strawberry.union("CreateManagementTokenResult"),
]


@strawberry.type
class ManagementTokenMutations:
    @strawberry.mutation(description="Mint a management token with some of your permissions.")
    async def create_management_token(
        self, info: Info, name: str, permissions: list[str]
    ) -> CreateManagementTokenResult:
        try:
            minted = await token_service.create_management_token(
                info.context.services, info.context.operator, name, permissions
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return CreateManagementTokenSuccess(
            id=strawberry.ID(minted.record.public_id),
            name=minted.record.name,
            permissions=list(minted.record.permissions),
            token=minted.token,
        )
