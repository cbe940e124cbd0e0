"""Settings: every bad value is refused at start-up with its name and value (a password in the
database URL masked), and a server never starts on a database it would fail on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.settings import Settings, SettingsError
from tests.live import live_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        # At 0 (or NaN) a background loop never waited: an idle server used a whole core.
        ("KEYPLANE_FLUSH_INTERVAL_SECONDS", "0", "below 0.01"),
        ("KEYPLANE_FLUSH_INTERVAL_SECONDS", "nan", "finite"),
        ("KEYPLANE_CACHE_REFRESH_SECONDS", "0", "below 0.01"),
        ("KEYPLANE_CACHE_REFRESH_SECONDS", "nan", "finite"),
        ("KEYPLANE_MAX_STALENESS_SECONDS", "nan", "finite"),
        ("KEYPLANE_NEGATIVE_CACHE_SECONDS", "inf", "finite"),
        ("KEYPLANE_NEGATIVE_CACHE_SECONDS", "-1", "negative"),
        ("KEYPLANE_CACHE_SIZE", "1.5", "whole number"),
        ("KEYPLANE_MAX_BODY_BYTES", "abc", "whole number"),
        ("KEYPLANE_MAX_BODY_BYTES", "100", "below 1024"),
    ],
)
def test_a_bad_number_is_refused_naming_it(name: str, raw: str, says: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({name: raw})
    assert f"{name}={raw!r}" in str(refused.value)
    assert says in str(refused.value)


@pytest.mark.parametrize(
    "url",
    ["garbage", "mysql://keyplane:s3cret-pw@db/keyplane", "keyplane:s3cret-pw@db", "sqlite://"],
)
def test_a_database_url_keyplane_cannot_use_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"KEYPLANE_DATABASE_URL": url})
    message = str(refused.value)
    assert "KEYPLANE_DATABASE_URL=" in message and "sqlite://PATH" in message
    assert "s3cret" not in message
    if "@" in url:
        assert "***@db" in message


def test_the_cli_names_a_bad_database_url_and_exits_2() -> None:
    """It was a traceback ending in Tortoise's "Unknown DB scheme", which named nothing."""
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=ROOT,
        env={**os.environ, "KEYPLANE_DATABASE_URL": "garbage"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "KEYPLANE_DATABASE_URL='garbage'" in done.stderr
    assert "Traceback" not in done.stderr


def test_good_values_are_taken() -> None:
    settings = Settings.from_env(
        {
            "KEYPLANE_MAX_BODY_BYTES": "2048",
            "KEYPLANE_FLUSH_INTERVAL_SECONDS": "0.5",
            "KEYPLANE_NEGATIVE_CACHE_SECONDS": "0",
            "KEYPLANE_DATABASE_URL": "postgresql://u:p@db:5432/keyplane",
        }
    )
    assert settings.max_body_bytes == 2048
    assert settings.flush_interval_seconds == 0.5
    assert settings.negative_cache_seconds == 0
    assert settings.is_postgres


def test_max_body_bytes_applies_to_verify_and_graphql(tmp_path: Path) -> None:
    """KEYPLANE_MAX_BODY_BYTES was named in the README but never read."""
    url = f"sqlite://{tmp_path / 'body.db'}"
    env = {**os.environ, "KEYPLANE_DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"], cwd=ROOT, env=env, check=True, timeout=60
    )
    with live_server(url, {"KEYPLANE_MAX_BODY_BYTES": "2048"}) as base:
        padded = {"query": "{ __typename }", "pad": "x" * 3000}
        assert httpx.post(f"{base}/graphql", json=padded, timeout=10).status_code == 413
        small = httpx.post(f"{base}/graphql", json={"query": "{ __typename }"}, timeout=10)
        assert small.status_code != 413
        # A body over the limit is not read for a key (MISSING_KEY); one under it is.
        codes = [
            httpx.post(
                f"{base}/v1/verify", json={"key": "kp_nonsense", "pad": "x" * pad}, timeout=10
            ).json()["code"]
            for pad in (3000, 1000)
        ]
        assert codes == ["MISSING_KEY", "INVALID_KEY"]


def test_serve_refuses_a_database_that_was_not_migrated(tmp_path: Path) -> None:
    """It started, answered /governance/health with ok, and every verification with 503."""
    url = f"sqlite://{tmp_path / 'never-migrated.db'}"
    with pytest.raises(RuntimeError) as refused, live_server(url, timeout=30):
        pass
    assert "run `keyplane migrate` first" in str(refused.value)
