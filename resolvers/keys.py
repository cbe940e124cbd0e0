"""Queries and mutations for API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

import models
from app.errors import DomainError
from app.services import keys as key_service
from resolvers.context import Info
from resolvers.errors import (
    InvalidStateError,
    KeyLimitReachedError,
    NotFoundError,
    ValidationFailedError,
    error_value,
)
from resolvers.types import ApiKeyType, KeyConnection, KeyEdge, KeyStatus, KeyType, PageInfo


@strawberry.input
class CreateKeyInput:
    environment_id: strawberry.ID
    name: str
    type: KeyType | None = KeyType.SERVER  # the contract's `KeyType = SERVER`; null is SERVER
    permissions: list[str] | None = None
    role_id: strawberry.ID | None = None
    allowed_ips: list[str] | None = None
    expires_at: datetime | None = None
    description: str | None = None


@strawberry.input
class UpdateKeyInput:
    """Only the fields sent change; an explicit null clears roleId, expiresAt, description."""

    name: str | None = strawberry.UNSET
    permissions: list[str] | None = strawberry.UNSET
    role_id: strawberry.ID | None = strawberry.UNSET
    expires_at: datetime | None = strawberry.UNSET
    description: str | None = strawberry.UNSET


@strawberry.type
class CreateKeySuccess:
    key: ApiKeyType
    secret: str = strawberry.field(description="The full token. Shown once, never again.")


@strawberry.type
class UpdateKeySuccess:
    key: ApiKeyType


@strawberry.type
class SetStatusSuccess:
    key: ApiKeyType


@strawberry.type
class RevokeSuccess:
    key: ApiKeyType


@strawberry.type
class SetAllowedIpsSuccess:
    key: ApiKeyType


@strawberry.type
class RotateKeySuccess:
    old_key: ApiKeyType
    new_key: ApiKeyType
    secret: str = strawberry.field(description="The new key's token. Shown once, never again.")


@strawberry.type(name="RotatedKey")
class RotatedKey:
    old_key: ApiKeyType
    new_key: ApiKeyType
    secret: str


@strawberry.type
class RotateAllSuccess:
    rotated: list[RotatedKey]


@strawberry.type
class DeleteKeySuccess:
    deleted_id: strawberry.ID


CreateKeyResult = Annotated[
    CreateKeySuccess | NotFoundError | ValidationFailedError | KeyLimitReachedError,
    strawberry.union("CreateKeyResult"),
]
UpdateKeyResult = Annotated[
    UpdateKeySuccess | NotFoundError | ValidationFailedError, strawberry.union("UpdateKeyResult")
]
SetStatusResult = Annotated[
    SetStatusSuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("SetStatusResult"),
]
RevokeResult = Annotated[
    RevokeSuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("RevokeResult"),
]
RotateKeyResult = Annotated[
    RotateKeySuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("RotateKeyResult"),
]
RotateAllResult = Annotated[
    RotateAllSuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("RotateAllResult"),
]
SetAllowedIpsResult = Annotated[
    SetAllowedIpsSuccess | NotFoundError | ValidationFailedError,
    strawberry.union("SetAllowedIpsResult"),
]
DeleteKeyResult = Annotated[
    DeleteKeySuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("DeleteKeyResult"),
]


def _unset_to_unchanged(value: object) -> object:
    return key_service.UNCHANGED if value is strawberry.UNSET else value


@strawberry.type
class KeyQueries:
    @strawberry.field(description="A key by its public ID; null if unknown or not yours.")
    async def key(self, info: Info, id: strawberry.ID) -> ApiKeyType | None:
        key = await key_service.get_key(info.context.operator, str(id))
        return ApiKeyType.from_model(key) if key else None

    @strawberry.field(description="Keys of the workspace, newest first.")
    async def keys(
        self,
        info: Info,
        environment_id: strawberry.ID | None = None,
        status: KeyStatus | None = None,
        type: KeyType | None = None,
        search: str | None = None,
        first: int | None = 50,
        after: str | None = None,
        rotation_due: bool | None = None,
    ) -> KeyConnection:
        page = await key_service.list_keys(
            info.context.operator,
            environment_id=str(environment_id) if environment_id is not None else None,
            status=models.KeyStatus(status.value) if status else None,
            key_type=models.KeyKind(type.value) if type else None,
            search=search,
            first=first,
            after=after,
            rotation_due=rotation_due,
            now=info.context.services.clock.now(),
        )
        edges = [
            KeyEdge(node=ApiKeyType.from_model(key), cursor=cursor)
            for key, cursor in zip(page.keys, page.cursors, strict=True)
        ]
        return KeyConnection(
            edges=edges,
            page_info=PageInfo(
                has_next_page=page.has_next, end_cursor=edges[-1].cursor if edges else None
            ),
            total_count=page.total,
        )


@strawberry.type
class KeyMutations:
    @strawberry.mutation(description="Mint a key. The secret is in the result, and only there.")
    async def create_key(self, info: Info, input: CreateKeyInput) -> CreateKeyResult:
        request = key_service.NewKey(
            environment_id=str(input.environment_id),
            name=input.name,
            type=models.KeyKind((input.type or KeyType.SERVER).value),
            permissions=input.permissions or [],
            role_id=str(input.role_id) if input.role_id is not None else None,
            allowed_ips=input.allowed_ips or [],
            expires_at=input.expires_at,
            description=input.description,
        )
        try:
            minted = await key_service.create_key(
                info.context.services, info.context.operator, request
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return CreateKeySuccess(key=ApiKeyType.from_model(minted.key), secret=minted.secret)

    @strawberry.mutation
    async def update_key(
        self, info: Info, id: strawberry.ID, input: UpdateKeyInput
    ) -> UpdateKeyResult:
        role_id = input.role_id
        changes = key_service.KeyChanges(
            name=_unset_to_unchanged(input.name),
            permissions=_unset_to_unchanged(input.permissions),
            role_id=_unset_to_unchanged(str(role_id) if role_id else role_id),
            expires_at=_unset_to_unchanged(input.expires_at),
            description=_unset_to_unchanged(input.description),
        )
        try:
            key = await key_service.update_key(
                info.context.services, info.context.operator, str(id), changes
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return UpdateKeySuccess(key=ApiKeyType.from_model(key))

    @strawberry.mutation(description="Enable or disable a key (REVOKED: use revoke).")
    async def set_status(self, info: Info, id: strawberry.ID, status: KeyStatus) -> SetStatusResult:
        try:
            key = await key_service.set_status(
                info.context.services,
                info.context.operator,
                str(id),
                models.KeyStatus(status.value),
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return SetStatusSuccess(key=ApiKeyType.from_model(key))

    @strawberry.mutation(description="Revoke a key; it keeps verifying for graceMinutes.")
    async def revoke(self, info: Info, id: strawberry.ID, grace_minutes: int = 0) -> RevokeResult:
        try:
            key = await key_service.revoke(
                info.context.services, info.context.operator, str(id), grace_minutes
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return RevokeSuccess(key=ApiKeyType.from_model(key))

    @strawberry.mutation(description="Replace a key by a new one with the same settings.")
    async def rotate_key(
        self, info: Info, id: strawberry.ID, grace_minutes: int = 60
    ) -> RotateKeyResult:
        try:
            rotation = await key_service.rotate_key(
                info.context.services, info.context.operator, str(id), grace_minutes
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return RotateKeySuccess(
            old_key=ApiKeyType.from_model(rotation.old_key),
            new_key=ApiKeyType.from_model(rotation.new_key),
            secret=rotation.secret,
        )

    @strawberry.mutation(description="Rotate every SERVER key of an environment not revoked.")
    async def rotate_all(
        self, info: Info, environment_id: strawberry.ID, grace_minutes: int = 0
    ) -> RotateAllResult:
        try:
            rotations = await key_service.rotate_all(
                info.context.services, info.context.operator, str(environment_id), grace_minutes
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return RotateAllSuccess(
            rotated=[
                RotatedKey(
                    old_key=ApiKeyType.from_model(r.old_key),
                    new_key=ApiKeyType.from_model(r.new_key),
                    secret=r.secret,
                )
                for r in rotations
            ]
        )

    @strawberry.mutation(description="Restrict a key to IPv4/IPv6 addresses or CIDRs; [] lifts it.")
    async def set_allowed_ips(
        self, info: Info, id: strawberry.ID, ips: list[str]
    ) -> SetAllowedIpsResult:
        try:
            key = await key_service.set_allowed_ips(
                info.context.services, info.context.operator, str(id), ips
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return SetAllowedIpsSuccess(key=ApiKeyType.from_model(key))

    @strawberry.mutation(description="Delete a key for good; its token becomes unknown.")
    async def delete_key(self, info: Info, id: strawberry.ID) -> DeleteKeyResult:
        try:
            deleted = await key_service.delete_key(
                info.context.services, info.context.operator, str(id)
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return DeleteKeySuccess(deleted_id=strawberry.ID(deleted))
