"""Workspaces, plans, bootstrap and the environments every workspace starts with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.db import transaction
from app.errors import ValidationFailed
from app.permissions import OPERATOR_PERMISSIONS
from app.services.environments import create_environment_rows
from app.services.validation import clean_name
from app.tokens import KEY_PREFIX_RE, MANAGEMENT_TAG, hash_secret, mint_bearer, new_public_id
from models import ApiKey, KeyKind, KeyStatus, ManagementToken, Plan, Role, Workspace

# Active keys (not revoked; client-side IDs not counted) allowed per plan; None = unlimited.
PLAN_KEY_LIMITS: dict[Plan, int | None] = {
    Plan.FREE: 1,
    Plan.STARTER: 2,
    Plan.GROWTH: 5,
    Plan.SCALE: 10,
    Plan.SCALE_BUSINESS: 25,
    Plan.SCALE_ENTERPRISE: None,
}
DEFAULT_ENVIRONMENTS = ("production", "staging", "development")
BUILT_IN_ROLES = {"full-access": ["*"]}
OWNER_TOKEN_NAME = "owner (bootstrap)"


@dataclass(frozen=True)
class BootstrapResult:
    workspace: Workspace
    token: str
    created: bool


def parse_plan(value: str) -> Plan:
    try:
        return Plan[value.strip().upper()]
    except KeyError:
        names = ", ".join(p.name for p in Plan)
        raise ValidationFailed(f"unknown plan {value!r}; use one of {names}", "plan") from None


def check_key_prefix(value: str) -> str:
    if not KEY_PREFIX_RE.match(value):
        raise ValidationFailed(
            f"key prefix {value!r} must be 2 to 12 lowercase letters", field="keyPrefix"
        )
    return value


async def bootstrap(name: str, plan: Plan, key_prefix: str, now: datetime) -> BootstrapResult:
    """Create the workspace if absent (with its default environments and roles) and mint an
    owner management token holding every operator permission. Re-running mints another token
    and changes nothing else."""
    name = clean_name(name, "workspace name")
    check_key_prefix(key_prefix)
    token = mint_bearer(MANAGEMENT_TAG)
    async with transaction():
        workspace = await Workspace.get_or_none(name=name)
        created = workspace is None
        if workspace is None:
            workspace = await Workspace.create(
                public_id=new_public_id("ws"), name=name, plan=plan, key_prefix=key_prefix
            )
            for env_name in DEFAULT_ENVIRONMENTS:
                await create_environment_rows(workspace, env_name, now)
            for role_name, permissions in BUILT_IN_ROLES.items():
                await Role.create(
                    public_id=new_public_id("role"),
                    workspace=workspace,
                    name=role_name,
                    permissions=permissions,
                    built_in=True,
                )
        await ManagementToken.create(
            public_id=new_public_id("mt"),
            workspace=workspace,
            name=OWNER_TOKEN_NAME,
            token_hash=hash_secret(token),
            permissions=list(OPERATOR_PERMISSIONS),
            created_at=now,
        )
    return BootstrapResult(workspace=workspace, token=token, created=created)


async def active_key_count(workspace_id: int) -> int:
    """Keys that count against the plan: not revoked, client-side IDs excluded."""
    return (
        await ApiKey.filter(workspace_id=workspace_id)
        .exclude(status=KeyStatus.REVOKED)
        .exclude(type=KeyKind.CLIENT_SIDE)
        .count()
    )
