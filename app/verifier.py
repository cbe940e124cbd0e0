"""The one place a token becomes a decision. Pure logic over a KeyRecord; no I/O, no Starlette
or Strawberry imports (the cache hands it the record, the HTTP adapter writes the response)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.net import Network


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything a verification needs to know about one key, as the cache holds it."""

    key_id: str  # public key ID (key_…)
    key_type: str  # "SERVER" | "MOBILE" | "CLIENT_SIDE"
    workspace_pk: int
    workspace_id: str  # public ws_…
    environment_pk: int
    environment_id: str  # public env_…
    status: str  # "ENABLED" | "DISABLED" | "REVOKED"
    permissions: frozenset[str]  # effective: direct plus role
    permission_list: tuple[str, ...]  # the same, sorted, for responses
    allowed_networks: tuple[Network, ...]  # parsed once when the entry is filled
    authorized_origins: frozenset[str]  # CLIENT_SIDE only: the environment's origins
    expires_at: datetime | None
    grace_ends_at: datetime | None
