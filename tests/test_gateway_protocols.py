"""Traefik ForwardAuth and Envoy ext_authz (HTTP service) in front of Keyplane: an EMULATION.

Neither gateway is packaged in Debian, so neither binary runs here. These tests read README.md's
Traefik dynamic configuration and Envoy static configuration, build from those snippets' own
settings the request each gateway is documented to send to Keyplane, send it through the real
app (real database, real key cache), and read Keyplane's answer the way each gateway does. They
check Keyplane against the documented request; they are not the gateway binaries, and cannot
catch a release that rejects the file or behaves otherwise.

What the emulations follow (the sources read; see `Traefik` and `Envoy` below):
- Traefik, pkg/middlewares/auth/forward.go (v2.x and v3.x): GET to `address` (the caller's
  method only with `preserveRequestMethod`), no body (unless `forwardBody`), the caller's headers
  without hop-by-hop ones, narrowed to `authRequestHeaders` when set; then `X-Forwarded-For` set
  to the caller's address (the caller's own value prepended only with `trustForwardHeader`) and
  `X-Forwarded-Method`, `-Proto`, `-Host`, `-Uri` set from the request. A 2xx passes; any other
  answer goes to the caller with its status, headers and body.
- Envoy, source/extensions/filters/common/ext_authz/ext_authz_http_impl.cc and
  check_request_utils.cc: the caller's method, `path_prefix` + the caller's path and query,
  `content-length: 0` and no body (unless `with_request_body`), only the headers matched by
  `allowed_headers` plus Host, Method, Path and Authorization (repeated headers joined by ","),
  then `authorization_request.headers_to_add` overriding them. Only 200 passes; a 5xx (or no
  answer) is an error answered with `status_on_error` (403 unset) and no body; any other status
  goes to the caller with Keyplane's headers (all but Host) and body.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from starlette.applications import Starlette

from app.cache import Unavailable
from tests.live import ROOT
from tests.support import WorkspaceHandle

README = ROOT / "README.md"
GATEWAY = "127.0.0.1"  # the gateway's address as Keyplane sees it (loopback: trusted by default)
UNTRUSTED_GATEWAY = "192.0.2.50"  # a gateway Keyplane was not told to trust
CALLER = "198.51.100.7"
OTHER = "203.0.113.9"
PRIVATE_CALLER = "10.1.2.3"  # a caller inside the default trusted ranges
PERMISSION = "pdf.generate"  # what both README snippets require


# --- the README snippets ---------------------------------------------------------------------


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _one_block(marker: str) -> dict[str, Any]:
    blocks = [b for b in _yaml_blocks() if marker in b]
    assert len(blocks) == 1, f"README.md should have exactly one ```yaml block with {marker!r}"
    parsed: dict[str, Any] = yaml.safe_load(blocks[0])
    return parsed


def traefik_config() -> dict[str, Any]:
    """The README's Traefik dynamic configuration."""
    return _one_block("forwardAuth:")


def envoy_config() -> dict[str, Any]:
    """The README's Envoy static configuration."""
    return _one_block("envoy.filters.http.ext_authz")


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == "envoy.filters.network.http_connection_manager"
    filters: list[dict[str, Any]] = hcm["typed_config"]["http_filters"]
    return filters


def ext_authz_config(config: dict[str, Any]) -> dict[str, Any]:
    (ext_authz,) = [f for f in _http_filters(config) if f["name"] == "envoy.filters.http.ext_authz"]
    typed: dict[str, Any] = ext_authz["typed_config"]
    return typed


# --- what the gateways send and how they read the answer -------------------------------------


@dataclass
class Outcome:
    """What the caller of the gateway gets, and what Keyplane was sent and answered."""

    passed: bool  # the request went on to the backend
    status: int  # the caller's status (the backend's 200 when passed)
    body: bytes  # the caller's body when refused
    keyplane: httpx.Response  # Keyplane's own answer to the gateway
    sent: httpx.Request  # the check request the gateway sent

    @property
    def code(self) -> str | None:
        """The contract's `code` as the caller sees it (None when no JSON reached the caller)."""
        try:
            code: str = json.loads(self.body)["code"]
        except (ValueError, KeyError, TypeError):
            return None
        return code


@dataclass
class CallerRequest:
    method: str = "GET"
    path: str = "/api/report"  # path and query, as the caller sent them
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    host: str = "api.example.com"
    tls: bool = False


HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade"}


class Traefik:
    """The `forwardAuth` middleware of the README's Traefik snippet (forward.go, see module doc)."""

    def __init__(self, keyplane: httpx.AsyncClient, config: dict[str, Any]) -> None:
        self.keyplane = keyplane
        (router,) = config["http"]["routers"].values()
        (name,) = router["middlewares"]
        self.auth: dict[str, Any] = config["http"]["middlewares"][name]["forwardAuth"]

    async def send(self, caller_ip: str, request: CallerRequest) -> Outcome:
        auth = self.auth
        trust = bool(auth.get("trustForwardHeader", False))
        method = request.method if auth.get("preserveRequestMethod") else "GET"
        # writeHeader: copy, drop hop-by-hop headers (and those `Connection` names), filter.
        dropped = set(HOP_BY_HOP)
        for name, value in request.headers:
            if name.lower() == "connection":
                dropped |= {v.strip().lower() for v in value.split(",")}
        headers = [(n, v) for n, v in request.headers if n.lower() not in dropped]
        allowed = [h.lower() for h in auth.get("authRequestHeaders") or []]
        if allowed:
            headers = [(n, v) for n, v in headers if n.lower() in allowed]

        def caller_header(name: str) -> str | None:
            values = [v for n, v in request.headers if n.lower() == name.lower()]
            return values[0] if values else None

        def set_header(name: str, value: str | None) -> None:
            headers[:] = [(n, v) for n, v in headers if n.lower() != name.lower()]
            if value is not None:
                headers.append((name, value))

        forwarded = caller_ip
        prior = [v for n, v in request.headers if n.lower() == "x-forwarded-for"]
        if trust and prior:
            forwarded = ", ".join(prior) + ", " + caller_ip
        set_header("X-Forwarded-For", forwarded)
        for name, own in (
            ("X-Forwarded-Method", request.method),
            ("X-Forwarded-Proto", "https" if request.tls else "http"),
            ("X-Forwarded-Host", request.host),
            ("X-Forwarded-Uri", request.path),
        ):
            sent = caller_header(name)
            set_header(name, sent if trust and sent else own)
        if trust and caller_header("X-Forwarded-Port"):
            set_header("X-Forwarded-Port", caller_header("X-Forwarded-Port"))

        body = request.body if auth.get("forwardBody") else b""
        check = self.keyplane.build_request(
            method, auth["address"], headers=headers, content=body or None
        )
        answer = await self.keyplane.send(check)
        if 200 <= answer.status_code < 300:
            return Outcome(True, 200, b"", answer, check)
        return Outcome(False, answer.status_code, answer.content, answer, check)


STATUS_CODES = {"Forbidden": 403, "Unauthorized": 401, "ServiceUnavailable": 503}


def _matches(pattern: dict[str, Any], key: str) -> bool:
    """An Envoy StringMatcher (the kinds a header allowlist uses) against a lower-case key."""
    ignore_case = bool(pattern.get("ignore_case", False))
    subject = key.lower() if ignore_case else key
    for kind, test in (
        ("exact", lambda s, v: s == v),
        ("prefix", lambda s, v: s.startswith(v)),
        ("suffix", lambda s, v: s.endswith(v)),
        ("contains", lambda s, v: v in s),
    ):
        if kind in pattern:
            value = pattern[kind].lower() if ignore_case else pattern[kind]
            return bool(test(subject, value))
    raise AssertionError(f"matcher not emulated: {pattern}")


class Envoy:
    """The `ext_authz` HTTP-service filter of the README's Envoy snippet (see module doc)."""

    def __init__(self, keyplane: httpx.AsyncClient, config: dict[str, Any]) -> None:
        self.keyplane = keyplane
        self.config = ext_authz_config(config)
        service = self.config["http_service"]
        legacy = service.get("authorization_request", {}).get("allowed_headers")
        assert not (legacy and self.config.get("allowed_headers")), "Envoy refuses both"
        self.patterns: list[dict[str, Any]] = (self.config.get("allowed_headers") or legacy or {})[
            "patterns"
        ]
        self.path_prefix: str = service.get("path_prefix", "")
        self.to_add: list[dict[str, str]] = service.get("authorization_request", {}).get(
            "headers_to_add", []
        )
        self.error_status = STATUS_CODES[
            self.config.get("status_on_error", {}).get("code", "Forbidden")
        ]
        assert not self.config.get("with_request_body"), "body forwarding is not emulated"

    def _format(self, value: str, caller_ip: str) -> str:
        known = {"%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%": caller_ip}
        for command in re.findall(r"%[A-Z_]+(?:\([^)]*\))?%", value):
            assert command in known, f"formatter not emulated: {command}"
            value = value.replace(command, known[command])
        return value

    async def send(self, caller_ip: str, request: CallerRequest) -> Outcome:
        # The CheckRequest's header map: lower-case keys, repeated headers joined by ",".
        downstream: dict[str, str] = {
            ":method": request.method,
            ":path": request.path,
            ":authority": request.host,
        }
        for name, value in request.headers:
            key = name.lower()
            downstream[key] = f"{downstream[key]},{value}" if key in downstream else value
        defaults = ("authorization", ":method", ":path", ":authority")
        headers: dict[str, str] = {"content-length": "0"}
        for key, value in downstream.items():
            if key == "content-length":
                continue
            if key in defaults or any(_matches(p, key) for p in self.patterns):
                headers[key] = value
        for entry in self.to_add:  # OVERWRITE_IF_EXISTS_OR_ADD
            headers[entry["key"].lower()] = self._format(entry["value"], caller_ip)
        method = headers.pop(":method")
        path = self.path_prefix + headers.pop(":path")
        host = headers.pop(":authority")
        check = self.keyplane.build_request(
            method, f"http://keyplane:8000{path}", headers={**headers, "host": host}
        )
        answer = await self.keyplane.send(check)
        if answer.status_code == 200:
            return Outcome(True, 200, b"", answer, check)
        if answer.status_code >= 500:
            return Outcome(False, self.error_status, b"", answer, check)
        return Outcome(False, answer.status_code, answer.content, answer, check)


Gateway = Traefik | Envoy


@pytest.fixture(params=["traefik", "envoy"])
async def gateway(request: pytest.FixtureRequest, app: Starlette) -> AsyncIterator[Gateway]:
    transport = httpx.ASGITransport(app=app, client=(GATEWAY, 51000))
    async with httpx.AsyncClient(transport=transport) as keyplane:
        if request.param == "traefik":
            yield Traefik(keyplane, traefik_config())
        else:
            yield Envoy(keyplane, envoy_config())


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {secret}")]


async def create_key(ws: WorkspaceHandle, **fields: Any) -> tuple[str, str]:
    fields.setdefault("permissions", [PERMISSION])
    return await ws.create_key(**fields)


# --- the snippets themselves -----------------------------------------------------------------


def test_the_traefik_snippet_has_what_forward_auth_needs() -> None:
    config = traefik_config()
    (router,) = config["http"]["routers"].values()
    assert router["middlewares"] == ["keyplane"]
    auth = config["http"]["middlewares"]["keyplane"]["forwardAuth"]
    address = urlsplit(auth["address"])
    assert (address.path, address.query) == ("/v1/verify", f"permissions={PERMISSION}")
    assert {"authorization", "x-api-key"} <= {h.lower() for h in auth["authRequestHeaders"]}
    assert "x-required-permissions" not in {h.lower() for h in auth["authRequestHeaders"]}
    assert not auth.get("trustForwardHeader")  # X-Forwarded-For: the caller's address alone
    assert not auth.get("preserveRequestMethod")  # GET, which `/v1/verify` answers


def test_the_envoy_snippet_has_what_ext_authz_needs() -> None:
    config = envoy_config()
    names = [f["name"] for f in _http_filters(config)]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = ext_authz_config(config)
    service = authz["http_service"]
    assert service["path_prefix"] == "/v1/verify"
    assert service["server_uri"]["timeout"]  # required by Envoy
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    keyplane = clusters[service["server_uri"]["cluster"]]
    (endpoints,) = keyplane["load_assignment"]["endpoints"]
    (endpoint,) = endpoints["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 8000
    patterns = authz["allowed_headers"]["patterns"]
    assert any(_matches(p, "authorization") for p in patterns)
    assert any(_matches(p, "x-api-key") for p in patterns)
    assert not any(_matches(p, "x-forwarded-for") for p in patterns)  # the caller's is dropped
    added = {h["key"]: h["value"] for h in service["authorization_request"]["headers_to_add"]}
    assert added["x-forwarded-for"] == "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"
    assert added["x-required-permissions"] == PERMISSION
    assert STATUS_CODES[authz["status_on_error"]["code"]] == 503
    assert not authz.get("failure_mode_allow")


# --- through the gateways --------------------------------------------------------------------


async def test_a_valid_key_passes_by_bearer_or_x_api_key(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    _, secret = await create_key(ws)
    for headers in (bearer(secret), [("X-API-Key", secret)]):
        outcome = await gateway.send(CALLER, CallerRequest(headers=headers))
        assert outcome.passed, outcome.keyplane.text
        assert outcome.keyplane.json()["code"] == "VALID"
        assert outcome.sent.headers["x-forwarded-for"] == CALLER


async def test_every_method_the_caller_uses_is_checked_and_passes(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    _, secret = await create_key(ws)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"):
        outcome = await gateway.send(
            CALLER,
            CallerRequest(
                method=method, path="/api/items/7?expand=1", headers=bearer(secret), body=b"{}"
            ),
        )
        assert outcome.passed, (method, outcome.keyplane.status_code, outcome.keyplane.text)
        expected = "GET" if isinstance(gateway, Traefik) else method
        assert outcome.sent.method == expected
        if isinstance(gateway, Envoy):
            assert outcome.sent.url.path == "/v1/verify/api/items/7"
            assert outcome.sent.url.query == b"expand=1"
            assert outcome.sent.headers["content-length"] == "0"
        else:
            assert outcome.sent.headers["x-forwarded-method"] == method
            assert outcome.sent.headers["x-forwarded-uri"] == "/api/items/7?expand=1"
        if outcome.sent.method == "HEAD":
            assert outcome.keyplane.content == b""
    root = await gateway.send(CALLER, CallerRequest(path="/", headers=bearer(secret)))
    assert root.passed


async def test_unknown_disabled_and_revoked_keys_are_refused_with_keyplanes_answer(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    unknown = await gateway.send(CALLER, CallerRequest(headers=bearer("kp_not_a_real_key")))
    assert (unknown.passed, unknown.status, unknown.code) == (False, 401, "INVALID_KEY")
    key_id, secret = await create_key(ws)
    assert (await gateway.send(CALLER, CallerRequest(headers=bearer(secret)))).passed
    await ws.q(
        "mutation($id: ID!, $s: KeyStatus!) { setStatus(id: $id, status: $s) { __typename } }",
        {"id": key_id, "s": "DISABLED"},
    )
    disabled = await gateway.send(CALLER, CallerRequest(headers=bearer(secret)))
    assert (disabled.passed, disabled.status, disabled.code) == (False, 401, "DISABLED")
    await ws.q("mutation($id: ID!) { revoke(id: $id) { __typename } }", {"id": key_id})
    revoked = await gateway.send(CALLER, CallerRequest(headers=[("X-API-Key", secret)]))
    assert (revoked.passed, revoked.status, revoked.code) == (False, 401, "REVOKED")
    assert secret.encode() not in revoked.body


async def test_a_missing_key_is_401_and_a_key_in_the_body_does_not_count(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    missing = await gateway.send(CALLER, CallerRequest())
    assert (missing.passed, missing.status, missing.code) == (False, 401, "MISSING_KEY")
    _, secret = await create_key(ws)
    in_body = await gateway.send(
        CALLER,
        CallerRequest(
            method="POST",
            headers=[("Content-Type", "application/json")],
            body=json.dumps({"key": secret}).encode(),
        ),
    )
    assert (in_body.passed, in_body.status, in_body.code) == (False, 401, "MISSING_KEY")
    # A header the snippet does not forward carries no key either.
    other = await gateway.send(CALLER, CallerRequest(headers=[("X-Token", secret)]))
    assert (other.passed, other.code) == (False, "MISSING_KEY")


async def test_the_snippets_required_permission_is_enforced_and_cannot_be_dropped(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    _, reader = await create_key(ws, permissions=["pdf.read"])
    refused = await gateway.send(CALLER, CallerRequest(headers=bearer(reader)))
    assert (refused.passed, refused.status, refused.code) == (
        False,
        403,
        "INSUFFICIENT_PERMISSIONS",
    )
    assert PERMISSION in json.loads(refused.body)["message"]
    # The caller naming a permission it holds replaces nothing (Traefik drops the header, Envoy
    # overrides it; a query parameter only adds).
    own = [*bearer(reader), ("X-Required-Permissions", "pdf.read")]
    assert not (await gateway.send(CALLER, CallerRequest(headers=own))).passed
    query = CallerRequest(path="/api/report?permissions=pdf.read", headers=bearer(reader))
    assert not (await gateway.send(CALLER, query)).passed
    _, wildcard = await create_key(ws, permissions=["pdf.*"])
    assert (await gateway.send(CALLER, CallerRequest(headers=bearer(wildcard)))).passed
    _, holder = await create_key(ws)
    extra = CallerRequest(path="/api/report?permissions=pdf.delete", headers=bearer(holder))
    added = await gateway.send(CALLER, extra)
    # Envoy passes the caller's query string on, and a permission named there only adds.
    assert added.passed is isinstance(gateway, Traefik)


async def test_an_ip_allowlist_sees_the_caller_not_the_gateway(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    _, secret = await create_key(ws, allowedIps=[CALLER])
    assert (await gateway.send(CALLER, CallerRequest(headers=bearer(secret)))).passed
    other = await gateway.send(OTHER, CallerRequest(headers=bearer(secret)))
    assert (other.passed, other.status, other.code) == (False, 403, "IP_NOT_ALLOWED")
    _, gateways_own = await create_key(ws, allowedIps=[GATEWAY])
    assert not (await gateway.send(CALLER, CallerRequest(headers=bearer(gateways_own)))).passed
    _, private = await create_key(ws, allowedIps=[PRIVATE_CALLER])
    assert (await gateway.send(PRIVATE_CALLER, CallerRequest(headers=bearer(private)))).passed


async def test_a_caller_cannot_spoof_its_ip_with_x_forwarded_for(
    gateway: Gateway, ws: WorkspaceHandle
) -> None:
    _, secret = await create_key(ws, allowedIps=[CALLER])
    for source in (OTHER, PRIVATE_CALLER):
        for spoof in (CALLER, f"{CALLER}, {CALLER}", f"10.0.0.1, {CALLER}"):
            headers = [*bearer(secret), ("X-Forwarded-For", spoof)]
            outcome = await gateway.send(source, CallerRequest(headers=headers))
            assert (outcome.passed, outcome.code) == (False, "IP_NOT_ALLOWED"), (source, spoof)
            assert outcome.sent.headers["x-forwarded-for"] == source


async def test_an_untrusted_gateway_address_makes_allowlists_see_the_gateway(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """Why the README says to list the gateway in KEYPLANE_TRUSTED_PROXIES."""
    _, secret = await create_key(ws, allowedIps=[CALLER])
    transport = httpx.ASGITransport(app=app, client=(UNTRUSTED_GATEWAY, 51000))
    async with httpx.AsyncClient(transport=transport) as keyplane:
        for gateway in (Traefik(keyplane, traefik_config()), Envoy(keyplane, envoy_config())):
            outcome = await gateway.send(CALLER, CallerRequest(headers=bearer(secret)))
            assert (outcome.passed, outcome.code) == (False, "IP_NOT_ALLOWED")


async def test_an_unavailable_keyplane_never_lets_the_request_through(
    gateway: Gateway, ws: WorkspaceHandle, app: Starlette, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await create_key(ws)  # created, never verified: not in the key cache

    async def unavailable(secret_hash: str) -> None:
        raise Unavailable

    monkeypatch.setattr(app.state.key_cache, "get", unavailable)
    outcome = await gateway.send(CALLER, CallerRequest(headers=bearer(secret)))
    assert outcome.keyplane.status_code == 503
    assert not outcome.passed
    if isinstance(gateway, Traefik):
        assert (outcome.status, outcome.code) == (503, "UNAVAILABLE")
    else:  # an error for Envoy: `status_on_error`, no body
        assert (outcome.status, outcome.body) == (503, b"")


# --- the routes the gateways use, directly ---------------------------------------------------


async def test_verify_under_a_path_answers_every_method_and_reads_no_body(
    ws: WorkspaceHandle,
) -> None:
    _, secret = await create_key(ws)
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        response = await ws.client.request(
            method, "/v1/verify/api/x", headers={"X-API-Key": secret}
        )
        assert (response.status_code, response.json()["code"]) == (200, "VALID"), method
    head = await ws.client.head("/v1/verify/api/x", headers={"X-API-Key": secret})
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) > 0  # the GET answer's length
    body = await ws.client.post("/v1/verify/api/x", json={"key": secret})
    assert body.json()["code"] == "MISSING_KEY"  # the caller's payload, not a verify request
    permissions = await ws.client.post(
        "/v1/verify/api/x", headers={"X-API-Key": secret}, json={"permissions": ["zzz"]}
    )
    assert permissions.json()["code"] == "VALID"
    query = await ws.client.delete(
        "/v1/verify/api/x?permissions=zzz", headers={"X-API-Key": secret}
    )
    assert (query.status_code, query.json()["code"]) == (403, "INSUFFICIENT_PERMISSIONS")


async def test_plain_verify_keeps_its_methods_and_bodies(ws: WorkspaceHandle) -> None:
    _, secret = await create_key(ws)
    assert (await ws.client.put("/v1/verify", headers={"X-API-Key": secret})).status_code == 405
    head = await ws.client.head("/v1/verify", headers={"X-API-Key": secret})
    assert head.status_code == 200 and head.content == b""
    posted = await ws.client.post("/v1/verify", json={"key": secret})
    assert posted.json()["code"] == "VALID"
    for empty in (b"", b" ", b"null", b"[1]", b"not json"):
        response = await ws.client.post("/v1/verify", content=empty)
        assert response.json()["code"] == "MISSING_KEY", empty
