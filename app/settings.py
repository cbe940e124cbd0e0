"""The one settings object, read from ``KEYPLANE_*`` environment variables once at start-up."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app.net import Network, normalise_origin, parse_network

DEFAULT_TRUSTED_PROXIES = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)


class SettingsError(ValueError):
    """A setting has a value Keyplane refuses to run with; the message says why."""


def default_database_url() -> str:
    """An SQLite file under ./data/, so `make run` works on a bare machine."""
    return "sqlite://" + str(Path("data") / "keyplane.sqlite3")


@dataclass(frozen=True)
class Settings:
    """Everything configurable about one Keyplane process."""

    database_url: str = field(default_factory=default_database_url)
    trusted_proxies: tuple[Network, ...] = field(
        default_factory=lambda: tuple(parse_network(p) for p in DEFAULT_TRUSTED_PROXIES)
    )
    cors_origins: tuple[str, ...] = ()
    graphiql: bool = True
    introspection: bool = True
    # Failed management authentications allowed per client IP per window before 429.
    auth_failure_limit: int = 20
    auth_failure_window_seconds: float = 60.0
    # Verification data plane (part 2).
    cache_size: int = 100_000
    negative_cache_seconds: float = 5.0
    cache_refresh_seconds: float = 30.0
    max_staleness_seconds: float = 60.0
    flush_interval_seconds: float = 1.0
    denial_rate_per_ip: int = 20
    denial_retention_days: int = 30
    max_body_bytes: int = 64 * 1024
    huge_pages: bool = True  # app.hugepages: the heap on transparent huge pages (Linux)
    # Anomaly detection (part 3); see README "Anomalies".
    new_ip_days: int = 30
    failure_spike_floor: int = 20
    failure_spike_factor: float = 5.0
    failure_baseline_days: int = 7

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith(("postgres://", "postgresql://", "asyncpg://"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment; raises SettingsError naming a bad value."""
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        if url := env.get("KEYPLANE_DATABASE_URL", "").strip():
            kwargs["database_url"] = check_database_url(url)
        if (raw := env.get("KEYPLANE_TRUSTED_PROXIES")) is not None:
            kwargs["trusted_proxies"] = parse_trusted_proxies(raw)
        if (raw := env.get("KEYPLANE_CORS_ORIGINS")) is not None:
            kwargs["cors_origins"] = parse_cors_origins(raw)
        for name, attr in (
            ("KEYPLANE_GRAPHIQL", "graphiql"),
            ("KEYPLANE_INTROSPECTION", "introspection"),
            ("KEYPLANE_HUGE_PAGES", "huge_pages"),
        ):
            if (raw := env.get(name)) is not None:
                kwargs[attr] = _parse_bool(name, raw)
        for name, (attr, kind, least) in NUMERIC.items():
            if (raw := env.get(name)) is not None:
                kwargs[attr] = _parse_number(name, raw, kind, least)
        return cls(**kwargs)  # type: ignore[arg-type]


# Numeric settings: (attribute, type, least value). The periods have a floor above zero: at 0 a
# background loop never waits, and one process used a whole core while idle.
NUMERIC: dict[str, tuple[str, type[int] | type[float], float]] = {
    "KEYPLANE_CACHE_SIZE": ("cache_size", int, 0),
    "KEYPLANE_NEGATIVE_CACHE_SECONDS": ("negative_cache_seconds", float, 0),
    "KEYPLANE_CACHE_REFRESH_SECONDS": ("cache_refresh_seconds", float, 0.01),
    "KEYPLANE_MAX_STALENESS_SECONDS": ("max_staleness_seconds", float, 0),
    "KEYPLANE_FLUSH_INTERVAL_SECONDS": ("flush_interval_seconds", float, 0.01),
    "KEYPLANE_DENIAL_RATE_PER_IP": ("denial_rate_per_ip", int, 0),
    "KEYPLANE_DENIAL_RETENTION_DAYS": ("denial_retention_days", int, 0),
    "KEYPLANE_MAX_BODY_BYTES": ("max_body_bytes", int, 1024),
    "KEYPLANE_AUTH_FAILURE_LIMIT": ("auth_failure_limit", int, 0),
    "KEYPLANE_NEW_IP_DAYS": ("new_ip_days", int, 0),
    "KEYPLANE_FAILURE_SPIKE_FLOOR": ("failure_spike_floor", int, 0),
    "KEYPLANE_FAILURE_SPIKE_FACTOR": ("failure_spike_factor", float, 0),
    "KEYPLANE_FAILURE_BASELINE_DAYS": ("failure_baseline_days", int, 0),
}
DATABASE_SCHEMES = ("sqlite://", "postgres://", "postgresql://", "asyncpg://")


def _parse_number(name: str, raw: str, kind: type[int] | type[float], least: float) -> float:
    try:
        value = kind(raw)
    except ValueError:
        whole = " whole" if kind is int else ""
        raise SettingsError(f"{name}={raw!r} is not a{whole} number") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be a finite number")
    if value < least:
        floor = "negative" if least == 0 else f"below {least:g}"
        raise SettingsError(f"{name}={raw!r} must not be {floor}")
    return value


def check_database_url(url: str) -> str:
    """A URL Keyplane can use; the error names the value with any password masked."""
    if url.startswith(DATABASE_SCHEMES) and len(url) > url.index("://") + 3:
        return url
    scheme, found, _ = url.rpartition("@")[0].partition("://")
    shown = url
    if "@" in url:  # whatever comes before the host may hold a password
        shown = f"{scheme}://***@" if found else "***@"
        shown += url.rpartition("@")[2]
    raise SettingsError(
        f"KEYPLANE_DATABASE_URL={shown!r} is not a database URL Keyplane can use: "
        "sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


def parse_trusted_proxies(raw: str) -> tuple[Network, ...]:
    """Parse KEYPLANE_TRUSTED_PROXIES; `*` is refused because it lets any client forge its IP."""
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            raise SettingsError(
                "KEYPLANE_TRUSTED_PROXIES='*' is refused: trusting every peer lets any client "
                "forge X-Forwarded-For and pass IP allowlists; list your proxies' IPs or CIDRs"
            )
        try:
            networks.append(parse_network(item))
        except ValueError:
            raise SettingsError(
                f"KEYPLANE_TRUSTED_PROXIES entry {item!r} is not an IP address or CIDR"
            ) from None
    return tuple(networks)


def parse_cors_origins(raw: str) -> tuple[str, ...]:
    """Parse KEYPLANE_CORS_ORIGINS; `*` is refused because /graphql takes bearer credentials."""
    origins: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item == "*":
            raise SettingsError(
                "KEYPLANE_CORS_ORIGINS='*' is refused: any web page could call the management "
                "API with a user's credentials; list your dashboards' exact origins"
            )
        try:
            origin = normalise_origin(item)
        except ValueError as exc:
            raise SettingsError(f"KEYPLANE_CORS_ORIGINS entry {item!r}: {exc}") from None
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


__all__ = ["Settings", "SettingsError", "ipaddress"]
