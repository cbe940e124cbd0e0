"""Management tokens: bearer credentials for the GraphQL API, holding operator permissions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.db import transaction
from app.errors import ValidationFailed
from app.permissions import OPERATOR_PERMISSIONS, TOKEN_CREATE
from app.services import Services, audit
from app.services.principal import Principal
from app.services.validation import clean_name
from app.tokens import MANAGEMENT_TAG, hash_secret, mint_bearer, new_public_id
from models import ManagementToken


@dataclass(frozen=True)
class MintedManagementToken:
    record: ManagementToken
    token: str


async def create_management_token(
    services: Services, principal: Principal, name: str, permissions: Sequence[str]
) -> MintedManagementToken:
    """Mint a token holding `permissions`, each an operator permission the caller holds
    itself (no token can grant more than its creator has)."""
    principal.require(TOKEN_CREATE)
    name = clean_name(name, "token name")
    cleaned: list[str] = []
    for permission in permissions:
        if permission not in OPERATOR_PERMISSIONS:
            known = ", ".join(OPERATOR_PERMISSIONS)
            raise ValidationFailed(
                f"unknown operator permission {permission!r}; use any of {known}",
                field="permissions",
            )
        principal.require(permission)
        if permission not in cleaned:
            cleaned.append(permission)
    now = services.clock.now()
    token = mint_bearer(MANAGEMENT_TAG)
    async with transaction():
        record = await ManagementToken.create(
            public_id=new_public_id("mt"),
            workspace_id=principal.workspace_id,
            name=name,
            token_hash=hash_secret(token),
            permissions=cleaned,
            created_at=now,
            created_by_member_id=principal.member_id,
        )
        await audit.record(
            principal,
            "management_token.create",
            now,
            token=record.public_id,
            name=name,
            permissions=cleaned,
        )
    return MintedManagementToken(record=record, token=token)
