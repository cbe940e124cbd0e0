"""Environments, their client-side IDs and authorized origins."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from app.db import transaction
from app.errors import NotFound, ValidationFailed
from app.net import normalise_origins
from app.permissions import KEY_CREATE, KEY_UPDATE, KEY_VIEW
from app.services import Services, audit
from app.services.principal import Principal
from app.services.validation import clean_name, require_public_id
from app.tokens import KeyType, display_prefix, hash_secret, mint_token, new_public_id
from models import ApiKey, Environment, KeyKind, KeyStatus, Workspace

MAX_ENVIRONMENT_NAME = 64
ROTATION_POLICY_DAYS = {"production": 90, "staging": 90, "development": 180}
DEFAULT_ROTATION_POLICY_DAYS = 90


def check_environment_name(name: str) -> str:
    """Any name (the contract's `production`, `staging`, `development`, or any name): 1 to 64
    printable characters once stripped, and not shaped like a secret."""
    return clean_name(name, "environment name", MAX_ENVIRONMENT_NAME, field="name")


async def create_environment_rows(workspace: Workspace, name: str, now: datetime) -> Environment:
    """Insert an environment and its one client-side ID (a CLIENT_SIDE key that is never
    revoked). Runs inside the caller's transaction."""
    client_side_id = mint_token(workspace.key_prefix, KeyType.CLIENT_SIDE)
    environment = await Environment.create(
        public_id=new_public_id("env"),
        workspace=workspace,
        name=name,
        client_side_id=client_side_id,
        authorized_origins=[],
        rotation_policy_days=ROTATION_POLICY_DAYS.get(name, DEFAULT_ROTATION_POLICY_DAYS),
    )
    await ApiKey.create(
        public_id=new_public_id("key"),
        workspace=workspace,
        environment=environment,
        name=f"Client-side ID ({name})",
        type=KeyKind.CLIENT_SIDE,
        secret_hash=hash_secret(client_side_id),
        prefix=display_prefix(client_side_id),
        status=KeyStatus.ENABLED,
        permissions=[],
        allowed_ips=[],
        created_at=now,
        updated_at=now,
    )
    return environment


async def list_environments(principal: Principal) -> list[Environment]:
    principal.require(KEY_VIEW)
    return await Environment.filter(workspace_id=principal.workspace_id).order_by("id")


async def get_environment(principal: Principal, environment_id: str) -> Environment:
    """The caller's environment with this public ID; NotFound for another workspace's."""
    require_public_id(environment_id, "env", "environment")
    environment = await Environment.get_or_none(
        public_id=environment_id, workspace_id=principal.workspace_id
    )
    if environment is None:
        raise NotFound(f"environment {environment_id!r} not found")
    return environment


async def create_environment(services: Services, principal: Principal, name: str) -> Environment:
    principal.require(KEY_CREATE)
    name = check_environment_name(name)
    now = services.clock.now()
    async with transaction():
        # Locking the workspace row serialises concurrent creates of one name: without it two
        # could both pass the check and the second insert fail on the unique index.
        workspace = await Workspace.select_for_update().get(id=principal.workspace_id)
        if await Environment.exists(workspace_id=workspace.id, name=name):
            raise ValidationFailed(f"environment {name!r} already exists", field="name")
        environment = await create_environment_rows(workspace, name, now)
        await audit.record(
            principal, "environment.create", now, environment=environment.public_id, name=name
        )
    return environment


MAX_ROTATION_POLICY_DAYS = 3650


async def set_rotation_policy(
    services: Services, principal: Principal, environment_id: str, days: int
) -> Environment:
    """Set how many days a key of this environment may live before it is due for rotation."""
    principal.require(KEY_UPDATE)
    if not 1 <= days <= MAX_ROTATION_POLICY_DAYS:
        raise ValidationFailed(
            f"days={days} is out of range; use 1 to {MAX_ROTATION_POLICY_DAYS}", field="days"
        )
    now = services.clock.now()
    async with transaction():
        environment = await get_environment(principal, environment_id)
        previous = environment.rotation_policy_days
        environment.rotation_policy_days = days
        await environment.save(update_fields=["rotation_policy_days"])
        await audit.record(
            principal,
            "environment.set_rotation_policy",
            now,
            environment=environment.public_id,
            days=days,
            previous=previous,
        )
    return environment


async def set_authorized_origins(
    services: Services, principal: Principal, environment_id: str, origins: Sequence[str]
) -> Environment:
    principal.require(KEY_UPDATE)
    try:
        cleaned = normalise_origins(origins)
    except ValueError as exc:
        raise ValidationFailed(str(exc), field="origins") from None
    now = services.clock.now()
    async with transaction():
        environment = await get_environment(principal, environment_id)
        environment.authorized_origins = cleaned
        await environment.save(update_fields=["authorized_origins"])
        await audit.record(
            principal,
            "environment.set_authorized_origins",
            now,
            environment=environment.public_id,
            origins=cleaned,
        )
    await services.changes.keys_changed([hash_secret(environment.client_side_id)])
    return environment
