"""The one settings object, read from ``KEYPLANE_*`` environment variables once at start-up."""

from __future__ import annotations

import ipaddress
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
            kwargs["database_url"] = url
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
        numeric = {
            "KEYPLANE_CACHE_SIZE": ("cache_size", int),
            "KEYPLANE_NEGATIVE_CACHE_SECONDS": ("negative_cache_seconds", float),
            "KEYPLANE_CACHE_REFRESH_SECONDS": ("cache_refresh_seconds", float),
            "KEYPLANE_MAX_STALENESS_SECONDS": ("max_staleness_seconds", float),
            "KEYPLANE_FLUSH_INTERVAL_SECONDS": ("flush_interval_seconds", float),
            "KEYPLANE_DENIAL_RATE_PER_IP": ("denial_rate_per_ip", int),
            "KEYPLANE_DENIAL_RETENTION_DAYS": ("denial_retention_days", int),
            "KEYPLANE_AUTH_FAILURE_LIMIT": ("auth_failure_limit", int),
            "KEYPLANE_NEW_IP_DAYS": ("new_ip_days", int),
            "KEYPLANE_FAILURE_SPIKE_FLOOR": ("failure_spike_floor", int),
            "KEYPLANE_FAILURE_SPIKE_FACTOR": ("failure_spike_factor", float),
            "KEYPLANE_FAILURE_BASELINE_DAYS": ("failure_baseline_days", int),
        }
        for name, (attr, kind) in numeric.items():
            if (raw := env.get(name)) is not None:
                try:
                    value = kind(raw)
                except ValueError:
                    raise SettingsError(f"{name}={raw!r} is not a number") from None
                if value < 0:
                    raise SettingsError(f"{name}={raw!r} must not be negative")
                kwargs[attr] = value
        return cls(**kwargs)  # type: ignore[arg-type]


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
