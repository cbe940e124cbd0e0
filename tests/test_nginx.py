"""nginx `auth_request` in front of a live Keyplane, with the README's snippet as written.

The nginx block of README.md is read from the file, its Keyplane address pointed at a live
`keyplane serve`, and run by Debian's nginx (installed with apt-get when missing). A second
server block of the same nginx plays the protected backend (`upstream backend`).

What a client of nginx sees (nginx `auth_request` semantics, asserted below):
- Keyplane 200 -> the request goes on to the backend;
- Keyplane 401 / 403 -> the same status, with nginx's own error page (Keyplane's JSON and `code`
  never reach the client);
- Keyplane 503 UNAVAILABLE (or any other status) -> 500 Internal Server Error, never the backend.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.gateways import Admin, Gateway, cli_bootstrap, find_or_install, wait_for_port
from tests.live import ROOT, live_server
from tests.pgserver import free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
BACKEND_BODY = "upstream ok"
# Addresses on the loopback network: the test client can connect from any of them, nginx
# connects to Keyplane from 127.0.0.1.
CALLER = "127.0.0.2"


# --- nginx ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx() -> str:
    binary = find_or_install("nginx", "/usr/sbin/nginx")
    if binary is None:
        pytest.skip("nginx is not installed and `apt-get install -y nginx` did not work here")
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True)
    if "--with-http_auth_request_module" not in built.stderr + built.stdout:
        pytest.skip(f"{binary} was built without ngx_http_auth_request_module")
    return binary


def readme_snippet() -> str:
    """The ```nginx block of the README (the one operators copy)."""
    blocks = re.findall(r"```nginx\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "README.md should have exactly one nginx snippet"
    snippet: str = blocks[0]
    return snippet


@contextmanager
def run_nginx(binary: str, keyplane_url: str, prefix: Path) -> Iterator[str]:
    """Run nginx with the README snippet against `keyplane_url`; yields the gateway's URL."""
    snippet = readme_snippet()
    assert "http://127.0.0.1:8000/v1/verify" in snippet
    snippet = snippet.replace("http://127.0.0.1:8000", keyplane_url)
    prefix.mkdir(parents=True, exist_ok=True)
    port, backend_port = free_port(), free_port()  # never the same port twice
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type text/plain;

    upstream backend {{ server 127.0.0.1:{backend_port}; }}

    # The protected service. (`return` cannot live in the auth_request location itself: it
    # runs in the rewrite phase, before the access phase, and would skip the check.)
    server {{
        listen 127.0.0.1:{backend_port};
        location / {{ return 200 "{BACKEND_BODY} $request_method $request_uri\\n"; }}
    }}

    server {{
        listen 127.0.0.1:{port};
{snippet}
    }}
}}
""",
        encoding="utf-8",
    )
    error_log = prefix / "error.log"
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("nginx", port, process, error_log)
        wait_for_port("nginx", backend_port, process, error_log)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: workers finish, then all exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- Keyplane admin over the live server's GraphQL -----------------------------------------


@pytest.fixture(scope="module")
def gateway(
    nginx: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    token = cli_bootstrap(database_url, "nginx")
    with live_server(database_url) as base_url:
        admin = Admin(base_url, token)
        admin.load_environments()
        with run_nginx(nginx, base_url, tmp_path_factory.mktemp("nginx")) as url:
            yield Gateway(url, admin)


def _passed(response: httpx.Response, path: str = "/api/report", method: str = "GET") -> bool:
    return response.status_code == 200 and response.text == f"{BACKEND_BODY} {method} {path}\n"


# --- tests ---------------------------------------------------------------------------------


def test_readme_snippet_has_the_directives_auth_request_needs() -> None:
    snippet = readme_snippet()
    for directive in (
        "internal;",
        "proxy_pass http://127.0.0.1:8000/v1/verify;",
        "proxy_pass_request_body off;",
        'proxy_set_header Content-Length "";',
        "proxy_set_header X-Forwarded-For $remote_addr;",
        'proxy_set_header X-Required-Permissions "pdf.generate";',
        "auth_request /_keyplane;",
    ):
        assert directive in snippet, directive


def test_a_valid_key_reaches_the_backend_by_bearer_or_x_api_key(gateway: Gateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    assert _passed(gateway.get(secret))
    assert _passed(gateway.get(headers={"X-API-Key": secret}))
    # Other methods too: the subrequest carries no body, so Keyplane does not wait for one,
    # and the backend still gets the original request.
    posted = gateway.get(secret, method="POST", path="/api/upload", content=b'{"a": 1}')
    assert _passed(posted, "/api/upload", "POST")


def test_a_request_without_a_key_gets_401_and_nginx_s_own_page(gateway: Gateway) -> None:
    response = gateway.get()
    assert response.status_code == 401
    assert BACKEND_BODY not in response.text
    assert '"code"' not in response.text  # Keyplane's JSON is not relayed by auth_request


def test_the_body_never_reaches_keyplane_so_a_key_in_it_is_missing(gateway: Gateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    response = gateway.get(method="POST", json={"key": secret})
    assert response.status_code == 401
    assert secret not in response.text


def test_unknown_disabled_and_revoked_keys_get_401(gateway: Gateway) -> None:
    assert gateway.get("kp_not_a_real_key").status_code == 401
    key_id, secret = gateway.admin.create_key(permissions=["pdf.generate"])
    assert _passed(gateway.get(secret))  # now cached in the live server
    gateway.admin.set_status(key_id, "DISABLED")
    assert gateway.get(secret).status_code == 401
    gateway.admin.set_status(key_id, "ENABLED")
    assert _passed(gateway.get(secret))
    gateway.admin.revoke(key_id)
    response = gateway.get(secret)
    assert response.status_code == 401 and BACKEND_BODY not in response.text


def test_a_key_lacking_the_required_permission_gets_403(gateway: Gateway) -> None:
    _, reader = gateway.admin.create_key(permissions=["pdf.read"])
    response = gateway.get(reader)
    assert response.status_code == 403 and BACKEND_BODY not in response.text
    _, no_permissions = gateway.admin.create_key()
    assert gateway.get(no_permissions).status_code == 403
    _, wildcard = gateway.admin.create_key(permissions=["pdf.*"])
    assert _passed(gateway.get(wildcard))


def test_an_ip_allowlist_without_the_caller_gets_403(gateway: Gateway) -> None:
    _, secret = gateway.admin.create_key(
        permissions=["pdf.generate"], allowedIps=["198.51.100.0/24", "::1"]
    )
    response = gateway.get(secret)  # from 127.0.0.1
    assert response.status_code == 403 and BACKEND_BODY not in response.text


def test_the_allowlist_is_checked_against_the_caller_not_nginx(gateway: Gateway) -> None:
    # The caller connects from 127.0.0.2; nginx connects to Keyplane from 127.0.0.1.
    _, callers = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=[CALLER])
    assert _passed(gateway.get(callers, source=CALLER))
    assert gateway.get(callers, source="127.0.0.1").status_code == 403
    _, nginxs = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=["127.0.0.1"])
    assert gateway.get(nginxs, source=CALLER).status_code == 403


def test_a_caller_cannot_spoof_its_ip_through_nginx(gateway: Gateway) -> None:
    _, secret = gateway.admin.create_key(permissions=["pdf.generate"], allowedIps=["198.51.100.7"])
    for spoof in ("198.51.100.7", "198.51.100.7, 198.51.100.7", "10.0.0.1, 198.51.100.7"):
        response = gateway.get(secret, source=CALLER, headers={"X-Forwarded-For": spoof})
        assert response.status_code == 403, spoof
        assert BACKEND_BODY not in response.text


def test_keyplane_unavailable_503_becomes_500_and_never_reaches_the_backend(
    nginx: str, tmp_path: Path
) -> None:
    # A Keyplane of its own (SQLite file in tmp_path) whose key table is then taken away, so a
    # key it has not cached cannot be decided: Keyplane answers 503 UNAVAILABLE.
    database = tmp_path / "unavailable.sqlite3"
    url = f"sqlite://{database}"
    token = cli_bootstrap(url, "nginx")
    with live_server(url) as base_url:
        admin = Admin(base_url, token)
        admin.load_environments()
        _, secret = admin.create_key(permissions=["pdf.generate"])
        with sqlite3.connect(database, timeout=10) as db:
            db.execute("ALTER TABLE api_keys RENAME TO api_keys_away")
        direct = httpx.get(
            f"{base_url}/v1/verify", headers={"Authorization": f"Bearer {secret}"}, timeout=15
        )
        assert (direct.status_code, direct.json()["code"]) == (503, "UNAVAILABLE")
        with run_nginx(nginx, base_url, tmp_path / "nginx") as gateway_url:
            response = httpx.get(
                f"{gateway_url}/api/report",
                headers={"Authorization": f"Bearer {secret}"},
                timeout=15,
            )
        assert response.status_code == 500
        assert BACKEND_BODY not in response.text
        log = (tmp_path / "nginx" / "error.log").read_text()
        assert "auth request unexpected status: 503" in log
