"""Team members, login and logout."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

import models
from app.errors import DomainError
from app.services import members as member_service
from resolvers.context import Info
from resolvers.errors import (
    InvalidCredentialsError,
    InvalidStateError,
    NotFoundError,
    ValidationFailedError,
    error_value,
)
from resolvers.types import MemberRole


@strawberry.type(name="Member")
class MemberType:
    id: strawberry.ID
    email: str
    name: str | None
    role: MemberRole

    @classmethod
    def from_model(cls, member: models.Member) -> MemberType:
        return cls(
            id=strawberry.ID(member.public_id),
            email=member.email,
            name=member.name,
            role=MemberRole(member.role.value),
        )


@strawberry.type
class LoginSuccess:
    token: str = strawberry.field(description="Session bearer token. Shown once.")
    expires_at: datetime
    member: MemberType


@strawberry.type
class LogoutSuccess:
    ended: bool


@strawberry.type
class InviteMemberSuccess:
    member: MemberType
    invite_token: str = strawberry.field(
        description="One-time invitation token for the invitee's acceptInvite. Shown once."
    )
    invite_expires_at: datetime


@strawberry.type
class UpdateMemberSuccess:
    member: MemberType


@strawberry.type
class RemoveMemberSuccess:
    removed_id: strawberry.ID


LoginResult = Annotated[LoginSuccess | InvalidCredentialsError, strawberry.union("LoginResult")]
LogoutResult = Annotated[LogoutSuccess | InvalidStateError, strawberry.union("LogoutResult")]
AcceptInviteResult = Annotated[
    LoginSuccess | InvalidCredentialsError | ValidationFailedError,
    strawberry.union("AcceptInviteResult"),
]
InviteMemberResult = Annotated[
    InviteMemberSuccess | ValidationFailedError, strawberry.union("InviteMemberResult")
]
UpdateMemberResult = Annotated[
    UpdateMemberSuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("UpdateMemberResult"),
]
RemoveMemberResult = Annotated[
    RemoveMemberSuccess | NotFoundError | ValidationFailedError | InvalidStateError,
    strawberry.union("RemoveMemberResult"),
]


@strawberry.type
class MemberQueries:
    @strawberry.field
    async def members(self, info: Info) -> list[MemberType]:
        rows = await member_service.list_members(info.context.operator)
        return [MemberType.from_model(m) for m in rows]


@strawberry.type
class MemberMutations:
    @strawberry.mutation(description="Log in; needs no bearer. Wrong email or password alike.")
    async def login(self, info: Info, email: str, password: str) -> LoginResult:
        context = info.context
        try:
            session = await member_service.login(email, password, context.services.clock.now())
        except DomainError as exc:
            context.record_auth_failure()
            return error_value(exc)  # type: ignore[return-value]
        return LoginSuccess(
            token=session.token,
            expires_at=session.expires_at,
            member=MemberType.from_model(session.member),
        )

    @strawberry.mutation(
        description="An invited member sets a password (and name) with their invitation "
        "token and is logged in; needs no bearer. The token works once."
    )
    async def accept_invite(
        self, info: Info, token: str, password: str, name: str | None = None
    ) -> AcceptInviteResult:
        context = info.context
        try:
            session = await member_service.accept_invite(
                token, password, name, context.services.clock.now()
            )
        except DomainError as exc:
            if exc.code == "INVALID_CREDENTIALS":
                context.record_auth_failure()
            return error_value(exc)  # type: ignore[return-value]
        return LoginSuccess(
            token=session.token,
            expires_at=session.expires_at,
            member=MemberType.from_model(session.member),
        )

    @strawberry.mutation(description="End the calling session.")
    async def logout(self, info: Info) -> LogoutResult:
        try:
            await member_service.logout(info.context.services, info.context.operator)
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return LogoutSuccess(ended=True)

    @strawberry.mutation
    async def invite_member(self, info: Info, email: str, role: MemberRole) -> InviteMemberResult:
        try:
            invited = await member_service.invite_member(
                info.context.services, info.context.operator, email, models.MemberRole(role.value)
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return InviteMemberSuccess(
            member=MemberType.from_model(invited.member),
            invite_token=invited.token,
            invite_expires_at=invited.expires_at,
        )

    @strawberry.mutation
    async def update_member(
        self, info: Info, id: strawberry.ID, role: MemberRole
    ) -> UpdateMemberResult:
        try:
            member = await member_service.update_member(
                info.context.services, info.context.operator, str(id), models.MemberRole(role.value)
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return UpdateMemberSuccess(member=MemberType.from_model(member))

    @strawberry.mutation(description="Remove a member; their sessions end at once.")
    async def remove_member(self, info: Info, id: strawberry.ID) -> RemoveMemberResult:
        try:
            removed = await member_service.remove_member(
                info.context.services, info.context.operator, str(id)
            )
        except DomainError as exc:
            return error_value(exc)  # type: ignore[return-value]
        return RemoveMemberSuccess(removed_id=strawberry.ID(removed))
