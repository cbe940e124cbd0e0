"""The typed per-request context every resolver receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from strawberry.dataloader import DataLoader
from strawberry.types import Info as StrawberryInfo

from app.services import Services
from app.services.principal import Principal
from app.usage import KeyTotals, key_totals
from models import Environment, Role


class Unauthenticated(Exception):
    """No usable credentials for an operation that needs them (the HTTP gate answers 401)."""


async def _load_environments(ids: list[int]) -> list[Environment | None]:
    rows = {row.id: row for row in await Environment.filter(id__in=set(ids))}
    return [rows.get(i) for i in ids]


async def _load_roles(ids: list[int]) -> list[Role | None]:
    rows = {row.id: row for row in await Role.filter(id__in=set(ids))}
    return [rows.get(i) for i in ids]


async def _load_key_totals(key_ids: list[str]) -> list[KeyTotals | None]:
    totals = await key_totals(sorted(set(key_ids)))
    return [totals.get(k) for k in key_ids]


@dataclass
class Loaders:
    """Batch loaders: a page of keys costs one query per related table, not one per key."""

    environment: DataLoader[int, Environment | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_environments)
    )
    role: DataLoader[int, Role | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_roles)
    )
    # A key's lifetime usage: its counters plus its buckets not yet rolled into them, read in
    # one statement (app.usage); None for a key deleted since it was read.
    key_totals: DataLoader[str, KeyTotals | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_key_totals)
    )


@dataclass
class Context:
    services: Services
    principal: Principal | None
    client_ip: str | None
    bearer: str | None
    loaders: Loaders = field(default_factory=Loaders)
    # Counts a failed login against the client IP (the gate answers 429 past the limit).
    on_auth_failure: Callable[[], None] = lambda: None

    def record_auth_failure(self) -> None:
        self.on_auth_failure()

    @property
    def operator(self) -> Principal:
        """The authenticated principal; the HTTP gate guarantees one for every operation but
        `login`, so reaching here without one is a bug, not a user error."""
        if self.principal is None:
            raise Unauthenticated("Authentication required")
        return self.principal


Info = StrawberryInfo[Context, None]
