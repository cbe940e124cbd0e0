"""The workspace and its environments."""

from __future__ import annotations

from typing import Annotated

import strawberry

from app.errors import DomainError
from app.permissions import KEY_VIEW
from app.services import environments as environment_service
from app.services.anomalies import BusinessHours
from app.services.workspaces import PLAN_KEY_LIMITS, active_key_count
from models import Workspace
from resolvers.anomalies import BusinessHoursType
from resolvers.context import Info
from resolvers.errors import NotFoundError, ValidationFailedError, error_value
from resolvers.types import EnvironmentType, Plan, WorkspaceType


@strawberry.type
class SetAuthorizedOriginsSuccess:
    environment: EnvironmentType


@strawberry.type
class CreateEnvironmentSuccess:
    environment: EnvironmentType


SetAuthorizedOriginsResult = Annotated[
    SetAuthorizedOriginsSuccess | NotFoundError | ValidationFailedError,
    strawberry.union("SetAuthorizedOriginsResult"),
]


@strawberry.type
class SetRotationPolicySuccess:
    environment: EnvironmentType


SetRotationPolicyResult = Annotated[
    SetRotationPolicySuccess | NotFoundError | ValidationFailedError,
    strawberry.union("SetRotationPolicyResult"),
]
CreateEnvironmentResult = Annotated[
    CreateEnvironmentSuccess | ValidationFailedError, strawberry.union("CreateEnvironmentResult")
]


@strawberry.type
class WorkspaceQueries:
    @strawberry.field(description="The caller's workspace.")
    async def workspace(self, info: Info) -> WorkspaceType:
        principal = info.context.operator
        principal.require(KEY_VIEW)
        workspace = await Workspace.get(id=principal.workspace_id)
        hours = BusinessHours.from_json(workspace.business_hours)
        return WorkspaceType(
            id=strawberry.ID(workspace.public_id),
            name=workspace.name,
            plan=Plan(workspace.plan.value),
            key_prefix=workspace.key_prefix,
            key_limit=PLAN_KEY_LIMITS[workspace.plan],
            active_key_count=await active_key_count(workspace.id),
            business_hours=BusinessHoursType.from_value(hours) if hours else None,
        )

    @strawberry.field
    async def environments(self, info: Info) -> list[EnvironmentType]:
        rows = await environment_service.list_environments(info.context.operator)
        return [EnvironmentType.from_model(env) for env in rows]


@strawberry.type
class WorkspaceMutations:
    @strawberry.mutation(description="Add an environment, with its own client-side ID.")
    async def create_environment(self, info: Info, name: str) -> CreateEnvironmentResult:
        try:
            env = await environment_service.create_environment(
                info.context.services, info.context.operator, name
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return CreateEnvironmentSuccess(environment=EnvironmentType.from_model(env))

    @strawberry.mutation(description="Web origins allowed to use the environment's client-side ID.")
    async def set_authorized_origins(
        self, info: Info, environment_id: strawberry.ID, origins: list[str]
    ) -> SetAuthorizedOriginsResult:
        try:
            env = await environment_service.set_authorized_origins(
                info.context.services, info.context.operator, str(environment_id), origins
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return SetAuthorizedOriginsSuccess(environment=EnvironmentType.from_model(env))

    @strawberry.mutation(description="Days a key of this environment may live before rotation.")
    async def set_rotation_policy(
        self, info: Info, environment_id: strawberry.ID, days: int
    ) -> SetRotationPolicyResult:
        try:
            env = await environment_service.set_rotation_policy(
                info.context.services, info.context.operator, str(environment_id), days
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return SetRotationPolicySuccess(environment=EnvironmentType.from_model(env))
