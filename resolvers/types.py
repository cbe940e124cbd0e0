"""GraphQL object types, each built explicitly from a model with `from_model()`."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import strawberry

import models
from app.services.keys import rotation_due_at
from resolvers.context import Info
from resolvers.scalars import BigInt

if TYPE_CHECKING:
    from resolvers.anomalies import BusinessHoursType


@strawberry.enum(name="KeyType")
class KeyType(Enum):
    SERVER = "SERVER"
    MOBILE = "MOBILE"
    CLIENT_SIDE = "CLIENT_SIDE"


@strawberry.enum(name="KeyStatus")
class KeyStatus(Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    REVOKED = "REVOKED"


@strawberry.enum(name="Plan")
class Plan(Enum):
    FREE = "FREE"
    STARTER = "STARTER"
    GROWTH = "GROWTH"
    SCALE = "SCALE"
    SCALE_BUSINESS = "SCALE_BUSINESS"
    SCALE_ENTERPRISE = "SCALE_ENTERPRISE"


@strawberry.enum(name="MemberRole")
class MemberRole(Enum):
    OWNER = "OWNER"
    ADMIN = "ADMIN"
    DEVELOPER = "DEVELOPER"
    VIEWER = "VIEWER"


@strawberry.type(name="Environment")
class EnvironmentType:
    id: strawberry.ID
    name: str
    client_side_id: str = strawberry.field(
        description="Public client-side ID for browsers; valid only from authorizedOrigins."
    )
    authorized_origins: list[str]
    rotation_policy_days: int

    @classmethod
    def from_model(cls, env: models.Environment) -> EnvironmentType:
        return cls(
            id=strawberry.ID(env.public_id),
            name=env.name,
            client_side_id=env.client_side_id,
            authorized_origins=list(env.authorized_origins),
            rotation_policy_days=env.rotation_policy_days,
        )


@strawberry.type(name="Role")
class RoleType:
    id: strawberry.ID
    name: str
    permissions: list[str]
    built_in: bool

    @classmethod
    def from_model(cls, role: models.Role) -> RoleType:
        return cls(
            id=strawberry.ID(role.public_id),
            name=role.name,
            permissions=list(role.permissions),
            built_in=role.built_in,
        )


@strawberry.type(name="KeyUsage")
class KeyUsage:
    total_requests: BigInt
    successful_requests: BigInt
    failed_requests: BigInt
    last_used_at: datetime | None


async def _usage(root: ApiKeyType, info: Info) -> KeyUsage:
    """The key's stored lifetime counters plus its usage buckets not yet rolled into them, read
    together (app.usage.key_totals); a key deleted since its row was read shows that row's."""
    totals = await info.context.loaders.key_totals.load(str(root.id))
    if totals is None:
        return root.counted
    return KeyUsage(
        total_requests=BigInt(totals.total),
        successful_requests=BigInt(totals.successful),
        failed_requests=BigInt(totals.failed),
        last_used_at=totals.last_used_at,
    )


async def _last_used_at(root: ApiKeyType, info: Info) -> datetime | None:
    return (await _usage(root, info)).last_used_at


@strawberry.type(name="ApiKey")
class ApiKeyType:
    id: strawberry.ID = strawberry.field(description="Public key ID (key_…), safe to log.")
    name: str
    description: str | None
    type: KeyType
    prefix: str = strawberry.field(description="The token's first characters.")
    status: KeyStatus
    permissions: list[str]
    allowed_ips: list[str]
    created_at: datetime
    last_used_at: datetime | None = strawberry.field(resolver=_last_used_at)
    expires_at: datetime | None
    revoked_at: datetime | None
    grace_ends_at: datetime | None
    rotated_from_id: strawberry.ID | None
    rotated_to_id: strawberry.ID | None
    usage: KeyUsage = strawberry.field(resolver=_usage)
    environment_pk: strawberry.Private[int]
    role_pk: strawberry.Private[int | None]
    # The key's lifetime counters as its row was read (usage reads them again, with its pending
    # buckets, in one statement).
    counted: strawberry.Private[KeyUsage]

    @strawberry.field
    async def environment(self, info: Info) -> EnvironmentType:
        env = await info.context.loaders.environment.load(self.environment_pk)
        assert env is not None  # a key's environment is a non-null foreign key
        return EnvironmentType.from_model(env)

    @strawberry.field(description="When the environment's rotation policy says to rotate.")
    async def rotation_due_at(self, info: Info) -> datetime | None:
        env = await info.context.loaders.environment.load(self.environment_pk)
        assert env is not None
        return rotation_due_at(
            self.created_at,
            models.KeyKind(self.type.value),
            models.KeyStatus(self.status.value),
            env.rotation_policy_days,
        )

    @strawberry.field(description="True once rotationDueAt has passed.")
    async def rotation_due(self, info: Info) -> bool:
        due_at = await self.rotation_due_at(info)
        return due_at is not None and due_at <= info.context.services.clock.now()

    @strawberry.field
    async def role(self, info: Info) -> RoleType | None:
        if self.role_pk is None:
            return None
        role = await info.context.loaders.role.load(self.role_pk)
        return RoleType.from_model(role) if role else None

    @classmethod
    def from_model(cls, key: models.ApiKey) -> ApiKeyType:
        return cls(
            id=strawberry.ID(key.public_id),
            name=key.name,
            description=key.description,
            type=KeyType(key.type.value),
            prefix=key.prefix,
            status=KeyStatus(key.status.value),
            permissions=list(key.permissions),
            allowed_ips=list(key.allowed_ips),
            created_at=key.created_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            grace_ends_at=key.grace_ends_at,
            rotated_from_id=strawberry.ID(key.rotated_from) if key.rotated_from else None,
            rotated_to_id=strawberry.ID(key.rotated_to) if key.rotated_to else None,
            environment_pk=key.environment_id,
            role_pk=key.role_id,
            counted=KeyUsage(
                total_requests=BigInt(key.total_requests),
                successful_requests=BigInt(key.successful_requests),
                failed_requests=BigInt(key.failed_requests),
                last_used_at=key.last_used_at,
            ),
        )


@strawberry.type(name="Workspace")
class WorkspaceType:
    id: strawberry.ID
    name: str
    plan: Plan
    key_prefix: str
    key_limit: int | None = strawberry.field(description="Active keys allowed; null = unlimited.")
    active_key_count: int
    business_hours: Annotated[BusinessHoursType, strawberry.lazy("resolvers.anomalies")] | None = (
        None
    )


@strawberry.type(name="PageInfo")
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type(name="KeyEdge")
class KeyEdge:
    node: ApiKeyType
    cursor: str


@strawberry.type(name="KeyConnection")
class KeyConnection:
    edges: list[KeyEdge]
    page_info: PageInfo
    total_count: int


@strawberry.type(name="AuditEvent")
class AuditEventType:
    id: strawberry.ID
    at: datetime
    action: str
    actor: str
    key_id: strawberry.ID | None
    detail: str | None

    @classmethod
    def from_model(cls, event: models.AuditEvent) -> AuditEventType:
        return cls(
            id=strawberry.ID(f"evt_{event.id}"),
            at=event.at,
            action=event.action,
            actor=event.actor,
            key_id=strawberry.ID(event.key_id) if event.key_id else None,
            detail=event.detail,
        )


@strawberry.type(name="AuditEdge")
class AuditEdge:
    node: AuditEventType
    cursor: str


@strawberry.type(name="AuditConnection")
class AuditConnection:
    edges: list[AuditEdge]
    page_info: PageInfo
    total_count: int
