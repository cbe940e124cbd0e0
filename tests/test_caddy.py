"""Caddy `forward_auth` in front of a live Keyplane, with the README's snippet as written.

The ```caddyfile block of README.md is read from the file, its Keyplane address pointed at a
live `keyplane serve` and its backend at a small HTTP server in this process (which records
what reaches it), and run by Debian's Caddy (installed with apt-get when missing).

What a client of Caddy sees (Caddy 2.6 `forward_auth` semantics, asserted below):
- Keyplane gets a GET /v1/verify with the caller's headers and query string, never its body;
- Keyplane 2xx -> the original request (method, path, body) goes on to the backend;
- any other answer -> returned to the caller as Keyplane wrote it (status, JSON body with
  `code`), never the backend; Keyplane unreachable -> Caddy's own 502;
- `X-Forwarded-For` is set by Caddy to the caller's address: one the caller sends is dropped
  (Caddy trusts no proxy unless `trusted_proxies` is configured), so it cannot be spoofed;
- `header_up X-Required-Permissions` replaces one the caller sends, and Keyplane ranks the header
  above a `?permissions=` the caller adds to its URL.
`copy_headers` is not exercised: Keyplane's answer carries its facts in the JSON body only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateways import Admin, Gateway, cli_bootstrap, find_or_install, wait_for_port
from tests.live import ROOT, live_server
from tests.pgserver import free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
BACKEND_BODY = "upstream ok"
# Addresses on the loopback network: the test client can connect from any of them, Caddy
# connects to Keyplane from 127.0.0.1.
CALLER = "127.0.0.2"
# What the README snippet names, replaced by the test's own addresses.
README_SITE = "api.example.com"
README_KEYPLANE = "127.0.0.1:8000"
README_BACKEND = "backend:8080"


# --- Caddy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caddy() -> str:
    binary = find_or_install("caddy", "/usr/bin/caddy")
    if binary is None:
        pytest.skip("caddy is not installed and `apt-get install -y caddy` did not work here")
    version = subprocess.run([binary, "version"], capture_output=True, text=True, check=True)
    found = re.match(r"v?(\d+)\.(\d+)", version.stdout.strip())
    if found is None or (int(found[1]), int(found[2])) < (2, 6):
        pytest.skip(f"{binary} is {version.stdout.strip()!r}; the snippet needs Caddy 2.6+")
    return binary


def readme_snippet() -> str:
    """The ```caddyfile block of the README (the one operators copy)."""
    blocks = re.findall(r"```caddyfile\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "README.md should have exactly one caddyfile snippet"
    snippet: str = blocks[0]
    return snippet


def _caddy_env(home: Path) -> dict[str, str]:
    """Caddy's data, config and autosave go under `home`, not the real home directory."""
    return {
        **os.environ,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),
        "XDG_CONFIG_HOME": str(home / "config"),
    }


def _adapt(binary: str, caddyfile: Path) -> dict[str, Any]:
    """`caddy adapt`: the JSON config Caddy would run."""
    result = subprocess.run(
        [binary, "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_caddy_env(caddyfile.parent),
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def write_caddyfile(keyplane_url: str, backend_port: int, port: int, folder: Path) -> Path:
    """The README snippet, pointed at `keyplane_url` and the backend, in a Caddyfile of its own."""
    snippet = readme_snippet()
    for name in (README_SITE, README_KEYPLANE, README_BACKEND):
        assert snippet.count(name) == 1, name
    snippet = (
        snippet.replace(README_SITE, f"http://127.0.0.1:{port}")
        .replace(README_KEYPLANE, keyplane_url.removeprefix("http://"))
        .replace(README_BACKEND, f"127.0.0.1:{backend_port}")
    )
    folder.mkdir(parents=True, exist_ok=True)
    caddyfile = folder / "Caddyfile"
    # `admin off`: no admin endpoint on :2019 (which two Caddys would fight over).
    caddyfile.write_text(
        f"{{\n\tadmin off\n\tdefault_bind 127.0.0.1\n\tgrace_period 2s\n}}\n\n{snippet}",
        encoding="utf-8",
    )
    return caddyfile


@contextmanager
def run_caddy(binary: str, keyplane_url: str, backend_port: int, folder: Path) -> Iterator[str]:
    """Run Caddy with the README snippet against `keyplane_url`; yields the gateway's URL."""
    port = free_port()
    caddyfile = write_caddyfile(keyplane_url, backend_port, port, folder)
    log = folder / "caddy.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_caddy_env(folder),
        )
    try:
        wait_for_port("caddy", port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the protected backend -----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    headers: dict[str, str]


class Backend:
    """A plain HTTP server on 127.0.0.1 that answers `upstream ok METHOD PATH` plus the body it
    got, and records every request that reached it."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen.append(Seen(self.command, self.path, body, dict(self.headers)))
                out = f"{BACKEND_BODY} {self.command} {self.path}\n".encode() + body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Backend:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


# --- Keyplane admin over the live server's GraphQL -----------------------------------------


@dataclass
class CaddyGateway(Gateway):
    backend: Backend

    def refused(self, response: httpx.Response, status: int, code: str) -> bool:
        """Keyplane's own refusal, relayed by Caddy, and the backend not reached for it."""
        return (
            response.status_code == status
            and response.headers.get("content-type") == "application/json"
            and response.json()["code"] == code
            and response.json()["valid"] is False
            and BACKEND_BODY not in response.text
        )


@pytest.fixture(scope="module")
def gateway(
    caddy: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CaddyGateway]:
    token = cli_bootstrap(database_url, "caddy")
    with live_server(database_url) as base_url, Backend() as backend:
        admin = Admin(base_url, token)
        admin.load_environments()
        with run_caddy(caddy, base_url, backend.port, tmp_path_factory.mktemp("caddy")) as url:
            yield CaddyGateway(url, admin, backend)


def _passed(
    response: httpx.Response, path: str = "/api/report", method: str = "GET", body: bytes = b""
) -> bool:
    expected = f"{BACKEND_BODY} {method} {path}\n".encode() + body
    return response.status_code == 200 and response.content == expected


# --- tests ---------------------------------------------------------------------------------


def test_readme_snippet_runs_forward_auth_before_the_backend(caddy: str, tmp_path: Path) -> None:
    snippet = readme_snippet()
    for directive in (
        f"{README_SITE} {{",
        f"forward_auth {README_KEYPLANE} {{",
        "uri /v1/verify",
        'header_up X-Required-Permissions "pdf.generate"',
        f"reverse_proxy {README_BACKEND}",
    ):
        assert directive in snippet, directive
    # Caddy orders directives itself (not by their place in the file): the snippet as written
    # must put forward_auth's GET /v1/verify first, and the backend only after it.
    (tmp_path / "Caddyfile").write_text(snippet, encoding="utf-8")
    config = _adapt(caddy, tmp_path / "Caddyfile")
    (server,) = config["apps"]["http"]["servers"].values()
    (route,) = server["routes"]
    assert route["match"] == [{"host": [README_SITE]}]
    (subroute,) = route["handle"]
    handlers = [h for r in subroute["routes"] for h in r["handle"]]
    assert [h["handler"] for h in handlers] == ["reverse_proxy", "reverse_proxy"]
    auth, backend = handlers
    assert auth["rewrite"] == {"method": "GET", "uri": "/v1/verify"}
    assert auth["upstreams"] == [{"dial": README_KEYPLANE}]
    assert auth["headers"]["request"]["set"]["X-Required-Permissions"] == ["pdf.generate"]
    assert [m["match"] for m in auth["handle_response"]] == [{"status_code": [2]}]
    assert backend["upstreams"] == [{"dial": README_BACKEND}]


def test_a_valid_key_reaches_the_backend_by_bearer_or_x_api_key(gateway: CaddyGateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    assert _passed(gateway.get(secret))
    assert _passed(gateway.get(headers={"X-API-Key": secret}))
    # Other methods too: Keyplane gets a GET without the body, and the backend still gets the
    # original request, body included.
    posted = gateway.get(secret, method="POST", path="/api/upload?x=1", content=b'{"a": 1}')
    assert _passed(posted, "/api/upload?x=1", "POST", b'{"a": 1}')
    assert gateway.backend.seen[-1].body == b'{"a": 1}'


def test_a_request_without_a_key_gets_keyplane_s_401_json(gateway: CaddyGateway) -> None:
    reached = len(gateway.backend.seen)
    response = gateway.get()
    assert gateway.refused(response, 401, "MISSING_KEY")
    assert len(gateway.backend.seen) == reached


def test_the_body_never_reaches_keyplane_so_a_key_in_it_is_missing(gateway: CaddyGateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    response = gateway.get(method="POST", json={"key": secret})
    assert gateway.refused(response, 401, "MISSING_KEY")
    assert secret not in response.text


def test_unknown_disabled_and_revoked_keys_get_401_with_their_code(gateway: CaddyGateway) -> None:
    reached = len(gateway.backend.seen)
    assert gateway.refused(gateway.get("kp_not_a_real_key"), 401, "INVALID_KEY")
    assert len(gateway.backend.seen) == reached
    key_id, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    assert _passed(gateway.get(secret))  # now cached in the live server
    gateway.admin.set_status(key_id, "DISABLED")
    assert gateway.refused(gateway.get(secret), 401, "DISABLED")
    gateway.admin.set_status(key_id, "ENABLED")
    assert _passed(gateway.get(secret))
    gateway.admin.revoke(key_id)
    reached = len(gateway.backend.seen)
    response = gateway.get(secret)
    assert gateway.refused(response, 401, "REVOKED")
    assert secret not in response.text
    assert len(gateway.backend.seen) == reached


def test_a_key_lacking_the_required_permission_gets_403(gateway: CaddyGateway) -> None:
    _, reader = gateway.admin.create_key(permissions=["pdf.read"])
    assert gateway.refused(gateway.get(reader), 403, "INSUFFICIENT_PERMISSIONS")
    _, no_permissions = gateway.admin.create_key()
    assert gateway.refused(gateway.get(no_permissions), 403, "INSUFFICIENT_PERMISSIONS")
    _, wildcard = gateway.admin.create_key(permissions=["pdf.*"])
    assert _passed(gateway.get(wildcard))


def test_a_caller_cannot_choose_the_required_permissions(gateway: CaddyGateway) -> None:
    # header_up replaces the caller's header; the caller's query string does reach Keyplane,
    # but requirements from every source add up, so it can only ask for more.
    _, reader = gateway.admin.create_key(permissions=["pdf.read"])
    for attempt in (
        {"headers": {"X-Required-Permissions": "pdf.read"}},
        {"headers": {"X-Required-Permissions": ""}},
        {"path": "/api/report?permissions=pdf.read"},
        {"path": "/api/report?permissions=", "headers": {"X-Required-Permissions": "pdf.read"}},
    ):
        assert gateway.refused(gateway.get(reader, **attempt), 403, "INSUFFICIENT_PERMISSIONS"), (
            attempt
        )


def test_an_ip_allowlist_without_the_caller_gets_403(gateway: CaddyGateway) -> None:
    _, secret = gateway.admin.create_key(
        permissions=["pdf.generate"], allowedIps=["198.51.100.0/24", "::1"]
    )
    response = gateway.get(secret)  # from 127.0.0.1
    assert gateway.refused(response, 403, "IP_NOT_ALLOWED")
    assert response.json()["message"] == "IP address not allowed"


def test_the_allowlist_is_checked_against_the_caller_not_caddy(gateway: CaddyGateway) -> None:
    # The caller connects from 127.0.0.2; Caddy connects to Keyplane from 127.0.0.1.
    _, callers = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=[CALLER])
    assert _passed(gateway.get(callers, source=CALLER))
    assert gateway.refused(gateway.get(callers, source="127.0.0.1"), 403, "IP_NOT_ALLOWED")
    _, caddys = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=["127.0.0.1"])
    assert gateway.refused(gateway.get(caddys, source=CALLER), 403, "IP_NOT_ALLOWED")


def test_a_caller_cannot_spoof_its_ip_through_caddy(gateway: CaddyGateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=["198.51.100.7"])
    reached = len(gateway.backend.seen)
    for spoof in (
        {"X-Forwarded-For": "198.51.100.7"},
        {"X-Forwarded-For": "198.51.100.7, 198.51.100.7"},
        {"X-Forwarded-For": "10.0.0.1, 198.51.100.7"},
        {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"},
        {"X-Real-IP": "198.51.100.7", "Forwarded": "for=198.51.100.7"},
    ):
        response = gateway.get(secret, source=CALLER, headers=spoof)
        assert gateway.refused(response, 403, "IP_NOT_ALLOWED"), spoof
    assert len(gateway.backend.seen) == reached
    # What Caddy passes on is the caller's address alone (seen here at the backend, which gets
    # the same X-Forwarded-For handling as the request to Keyplane).
    _, open_key = gateway.admin.create_key(permissions=["pdf.generate"])
    headers = {"X-Forwarded-For": "198.51.100.7"}
    assert _passed(gateway.get(open_key, source=CALLER, headers=headers))
    assert gateway.backend.seen[-1].headers["X-Forwarded-For"] == CALLER


def test_keyplane_unavailable_503_reaches_the_caller_and_never_the_backend(
    caddy: str, tmp_path: Path
) -> None:
    # A Keyplane of its own (SQLite file in tmp_path) whose key table is then taken away, so a
    # key it has not cached cannot be decided: Keyplane answers 503 UNAVAILABLE.
    database = tmp_path / "unavailable.sqlite3"
    url = f"sqlite://{database}"
    token = cli_bootstrap(url, "caddy")
    with live_server(url) as base_url, Backend() as backend:
        admin = Admin(base_url, token)
        admin.load_environments()
        _, secret = admin.create_key(permissions=["pdf.generate"])
        with sqlite3.connect(database, timeout=10) as db:
            db.execute("ALTER TABLE api_keys RENAME TO api_keys_away")
        direct = httpx.get(
            f"{base_url}/v1/verify", headers={"Authorization": f"Bearer {secret}"}, timeout=15
        )
        assert (direct.status_code, direct.json()["code"]) == (503, "UNAVAILABLE")
        with run_caddy(caddy, base_url, backend.port, tmp_path / "caddy") as gateway_url:
            response = httpx.get(
                f"{gateway_url}/api/report",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=15,
            )
        assert response.status_code == 503
        assert response.json()["code"] == "UNAVAILABLE"
        assert backend.seen == []


def test_keyplane_unreachable_gives_502_and_never_the_backend(caddy: str, tmp_path: Path) -> None:
    nothing = f"http://127.0.0.1:{free_port()}"  # no one listens there
    with Backend() as backend, run_caddy(caddy, nothing, backend.port, tmp_path) as gateway_url:
        response = httpx.get(
            f"{gateway_url}/api/report", headers={"Authorization": "Bearer kp_x"}, timeout=15
        )
    assert response.status_code == 502
    assert BACKEND_BODY not in response.text
    assert backend.seen == []
