"""Tortoise models: the tables of Keyplane. No business rules here; those live in app/services."""

from __future__ import annotations

from enum import Enum

from tortoise import fields
from tortoise.models import Model


class Plan(str, Enum):
    FREE = "FREE"
    STARTER = "STARTER"
    GROWTH = "GROWTH"
    SCALE = "SCALE"
    SCALE_BUSINESS = "SCALE_BUSINESS"
    SCALE_ENTERPRISE = "SCALE_ENTERPRISE"


class KeyStatus(str, Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    REVOKED = "REVOKED"


class KeyKind(str, Enum):
    SERVER = "SERVER"
    MOBILE = "MOBILE"
    CLIENT_SIDE = "CLIENT_SIDE"


class MemberRole(str, Enum):
    OWNER = "OWNER"
    ADMIN = "ADMIN"
    DEVELOPER = "DEVELOPER"
    VIEWER = "VIEWER"


class Workspace(Model):
    id = fields.IntField(primary_key=True)
    public_id = fields.CharField(max_length=32, unique=True)
    name = fields.CharField(max_length=100, unique=True)
    plan = fields.CharEnumField(Plan, max_length=20, default=Plan.GROWTH)
    key_prefix = fields.CharField(max_length=12, default="kp")
    # {"timeZone": "Europe/Paris", "days": [1, 2, 3, 4, 5], "startHour": 9, "endHour": 18};
    # null means no business hours, so no OFF_HOURS detection.
    business_hours = fields.JSONField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "workspaces"


class Environment(Model):
    id = fields.IntField(primary_key=True)
    public_id = fields.CharField(max_length=32, unique=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="environments", on_delete=fields.CASCADE
    )
    workspace_id: int
    name = fields.CharField(max_length=64)
    # The environment's client-side ID: public, minted with it, fixed for its life.
    client_side_id = fields.CharField(max_length=64, unique=True)
    authorized_origins = fields.JSONField(default=list)
    rotation_policy_days = fields.IntField(default=90)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "environments"
        unique_together = (("workspace", "name"),)


class Role(Model):
    id = fields.IntField(primary_key=True)
    public_id = fields.CharField(max_length=32, unique=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="roles", on_delete=fields.CASCADE
    )
    workspace_id: int
    name = fields.CharField(max_length=64)
    permissions = fields.JSONField(default=list)
    built_in = fields.BooleanField(default=False)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "roles"
        unique_together = (("workspace", "name"),)


class ApiKey(Model):
    id = fields.IntField(primary_key=True)
    # The public key ID (`key_…`): safe to log, returned by verify as keyId.
    public_id = fields.CharField(max_length=32, unique=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="keys", on_delete=fields.CASCADE
    )
    workspace_id: int
    environment: fields.ForeignKeyRelation[Environment] = fields.ForeignKeyField(
        "keyplane.Environment", related_name="keys", on_delete=fields.CASCADE
    )
    environment_id: int
    name = fields.CharField(max_length=100)
    description = fields.TextField(null=True)
    type = fields.CharEnumField(KeyKind, max_length=16)
    # SHA-256 of the token; the one indexed equality lookup a verification cache fill makes.
    secret_hash = fields.CharField(max_length=64, unique=True)
    prefix = fields.CharField(max_length=40)
    status = fields.CharEnumField(KeyStatus, max_length=16, default=KeyStatus.ENABLED)
    permissions = fields.JSONField(default=list)
    role: fields.ForeignKeyNullableRelation[Role] = fields.ForeignKeyField(
        "keyplane.Role", related_name="keys", null=True, on_delete=fields.SET_NULL
    )
    role_id: int | None
    allowed_ips = fields.JSONField(default=list)
    expires_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True)
    grace_ends_at = fields.DatetimeField(null=True)
    # Rotation lineage: the key this one replaced (public ID, kept after the old key is deleted).
    rotated_from = fields.CharField(max_length=32, null=True)
    rotated_to = fields.CharField(max_length=32, null=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()
    last_used_at = fields.DatetimeField(null=True)
    # Lifetime counters, advanced by the batched usage flush (never one write per request).
    total_requests = fields.BigIntField(default=0)
    successful_requests = fields.BigIntField(default=0)
    failed_requests = fields.BigIntField(default=0)

    class Meta:
        table = "api_keys"
        indexes = (("workspace_id", "created_at"), ("environment_id", "status"))


class ManagementToken(Model):
    id = fields.IntField(primary_key=True)
    public_id = fields.CharField(max_length=32, unique=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="management_tokens", on_delete=fields.CASCADE
    )
    workspace_id: int
    name = fields.CharField(max_length=100)
    token_hash = fields.CharField(max_length=64, unique=True)
    permissions = fields.JSONField(default=list)
    created_at = fields.DatetimeField()
    last_used_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True)
    # The member who minted it (None: bootstrap, or another token): such a token holds at most
    # what that member's role holds now, and nothing once the member is removed.
    created_by_member_id = fields.IntField(null=True)

    class Meta:
        table = "management_tokens"


class Member(Model):
    id = fields.IntField(primary_key=True)
    public_id = fields.CharField(max_length=32, unique=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="members", on_delete=fields.CASCADE
    )
    workspace_id: int
    # login(email, password) names no workspace: an email belongs to one member (migration 0009).
    email = fields.CharField(max_length=254, unique=True)
    name = fields.CharField(max_length=100, null=True)
    role = fields.CharEnumField(MemberRole, max_length=16)
    password_hash = fields.CharField(max_length=255, null=True)
    # A pending invitation: the SHA-256 of the one-time invite token, and when it lapses.
    invite_hash = fields.CharField(max_length=64, null=True, unique=True)
    invite_expires_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField()

    class Meta:
        table = "members"
        unique_together = (("workspace", "email"),)


class Session(Model):
    id = fields.IntField(primary_key=True)
    member: fields.ForeignKeyRelation[Member] = fields.ForeignKeyField(
        "keyplane.Member", related_name="sessions", on_delete=fields.CASCADE
    )
    member_id: int
    token_hash = fields.CharField(max_length=64, unique=True)
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    ended_at = fields.DatetimeField(null=True)

    class Meta:
        table = "sessions"


class AuditEvent(Model):
    id = fields.IntField(primary_key=True)
    workspace: fields.ForeignKeyRelation[Workspace] = fields.ForeignKeyField(
        "keyplane.Workspace", related_name="audit_events", on_delete=fields.CASCADE
    )
    workspace_id: int
    at = fields.DatetimeField()
    action = fields.CharField(max_length=64)
    actor = fields.CharField(max_length=200)
    # Public key ID, not a foreign key: the entry outlives a deleted key.
    key_id = fields.CharField(max_length=32, null=True, db_index=True)
    detail = fields.TextField(null=True)

    class Meta:
        table = "audit_events"
        indexes = (("workspace_id", "id"),)


class UsageBucket(Model):
    """Pre-aggregated verification counts per key per hour, written by the batched flush."""

    id = fields.BigIntField(primary_key=True)
    workspace_id = fields.IntField()
    environment_id = fields.IntField()
    key_id = fields.CharField(max_length=32)
    bucket_start = fields.DatetimeField()
    total_requests = fields.BigIntField(default=0)
    successful_requests = fields.BigIntField(default=0)
    failed_requests = fields.BigIntField(default=0)
    last_used_at = fields.DatetimeField(null=True)  # the latest VALID verification in the hour
    # A key's bucket is pending until the hourly roll-up adds it to the key's lifetime counters
    # (api_keys); a key's totals are its counters plus its pending buckets. Environment
    # buckets are never part of a key's counters: written as rolled.
    rolled = fields.BooleanField(default=False, db_default=False)
    # The process that wrote the row (random per process, see app.usage), so processes never
    # lock each other's rows; -1 (app.usage.MERGED_WRITER) for the row the roll-up merges a
    # closed hour's rows into; 0 for rows written before writers existed. Readers sum a key's
    # rows per hour.
    writer = fields.BigIntField(default=0, db_default=0)

    class Meta:
        table = "usage_buckets"
        unique_together = (("key_id", "bucket_start", "writer"),)
        indexes = (("environment_id", "bucket_start"),)


class UsageWriter(Model):
    """One row per usage recorder (a process, app.usage): the number of its last committed flush.
    A flush sets it inside its own transaction, so when the answer to a flush's COMMIT is lost
    (the connection dropped meanwhile), the next flush reads here whether that write committed
    instead of writing its counts a second time."""

    writer = fields.BigIntField(primary_key=True, generated=False)
    flushed = fields.BigIntField(default=0)
    at = fields.DatetimeField()  # the last flush's time (rows of writers long gone are pruned)

    class Meta:
        table = "usage_writers"


class Denial(Model):
    """One refused verification (or, under a flood, several folded into `count`)."""

    id = fields.BigIntField(primary_key=True)
    workspace_id = fields.IntField(null=True)
    environment_id = fields.IntField(null=True)
    key_id = fields.CharField(max_length=32, null=True)
    at = fields.DatetimeField()
    ip = fields.CharField(max_length=45)
    origin = fields.CharField(max_length=300, null=True)
    code = fields.CharField(max_length=32)
    message = fields.CharField(max_length=200)
    count = fields.IntField(default=1)

    class Meta:
        table = "denials"
        indexes = (("workspace_id", "at"), ("key_id", "at"), ("ip", "at"))


class KeyIp(Model):
    """Where each key has been used from, for NEW_IP detection."""

    id = fields.BigIntField(primary_key=True)
    key_id = fields.CharField(max_length=32)
    ip = fields.CharField(max_length=45)
    first_seen = fields.DatetimeField()
    last_seen = fields.DatetimeField()

    class Meta:
        table = "key_ips"
        unique_together = (("key_id", "ip"),)


class KeyPermissionUse(Model):
    """The first time each key was asked for each permission, for UNUSED_PERMISSION detection."""

    id = fields.BigIntField(primary_key=True)
    key_id = fields.CharField(max_length=32)
    permission = fields.CharField(max_length=128)
    first_used = fields.DatetimeField()

    class Meta:
        table = "key_permission_uses"
        unique_together = (("key_id", "permission"),)


class Anomaly(Model):
    """An event-driven anomaly (NEW_IP, UNUSED_PERMISSION) recorded when it was detected."""

    id = fields.BigIntField(primary_key=True)
    workspace_id = fields.IntField()
    environment_id = fields.IntField()
    key_id = fields.CharField(max_length=32)
    kind = fields.CharField(max_length=32)
    detected_at = fields.DatetimeField()
    detail = fields.CharField(max_length=300)

    class Meta:
        table = "anomalies"
        indexes = (("workspace_id", "detected_at"),)


__all__ = [
    "Anomaly",
    "ApiKey",
    "AuditEvent",
    "Denial",
    "Environment",
    "KeyIp",
    "KeyKind",
    "KeyPermissionUse",
    "KeyStatus",
    "ManagementToken",
    "Member",
    "MemberRole",
    "Plan",
    "Role",
    "Session",
    "UsageBucket",
    "Workspace",
]
