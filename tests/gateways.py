"""What the gateway tests (tests/test_nginx.py, tests/test_caddy.py) share: installing a Debian
package when it is missing, waiting for a port, bootstrapping a workspace with the CLI, and
driving a live Keyplane's GraphQL as its owner."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.live import ROOT
from tests.support import unique_name


def find_binary(name: str, fallback: str) -> str | None:
    for candidate in (shutil.which(name), fallback):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_or_install(package: str, fallback: str) -> str | None:
    """The package's binary, installed with apt-get (we run as root) when it is missing."""
    found = find_binary(package, fallback)
    if found:
        return found
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", package],
            check=True,
            capture_output=True,
            timeout=600,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return find_binary(package, fallback)


def wait_for_port(name: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{name} exited ({process.returncode}): {text[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on {port} in time") from None
            time.sleep(0.05)


def cli_bootstrap(database_url: str, tag: str) -> str:
    """`keyplane bootstrap` (migrates first); returns the owner token it prints."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "bootstrap",
            "--workspace",
            unique_name(tag),
            "--plan",
            "SCALE_ENTERPRISE",
        ],
        cwd=ROOT,
        env={**os.environ, "KEYPLANE_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    token: str = json.loads(result.stdout)["token"]
    return token


@dataclass
class Admin:
    base_url: str
    token: str
    environments: dict[str, str] = field(default_factory=dict)

    def q(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.post(
            f"{self.base_url}/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=15,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    def load_environments(self) -> None:
        for env in self.q("{ environments { id name } }")["environments"]:
            self.environments[env["name"]] = env["id"]

    def create_key(self, **fields: Any) -> tuple[str, str]:
        data = self.q(
            """mutation($input: CreateKeyInput!) { createKey(input: $input) {
                 __typename ... on CreateKeySuccess { secret key { id } }
                 ... on Error { code message } } }""",
            {"input": {"environmentId": self.environments["production"], "name": "gw", **fields}},
        )
        result = data["createKey"]
        assert result["__typename"] == "CreateKeySuccess", result
        return result["key"]["id"], result["secret"]

    def set_status(self, key_id: str, status: str) -> None:
        data = self.q(
            "mutation($id: ID!, $s: KeyStatus!) { setStatus(id: $id, status: $s) { __typename } }",
            {"id": key_id, "s": status},
        )
        assert data["setStatus"]["__typename"] == "SetStatusSuccess", data

    def revoke(self, key_id: str) -> None:
        data = self.q("mutation($id: ID!) { revoke(id: $id) { __typename } }", {"id": key_id})
        assert data["revoke"]["__typename"] == "RevokeSuccess", data


@dataclass
class Gateway:
    url: str
    admin: Admin

    def get(
        self, token: str | None = None, *, source: str = "127.0.0.1", **kw: Any
    ) -> httpx.Response:
        """GET /api/… through the gateway from `source` (a loopback address)."""
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=15) as client:
            return client.request(
                kw.pop("method", "GET"),
                f"{self.url}{kw.pop('path', '/api/report')}",
                headers=headers,
                **kw,
            )
