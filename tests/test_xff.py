"""X-Forwarded-For spoofing matrix (CONTRACT §4, client IP) with the default trusted proxies
(loopback and private ranges).

Each case is checked twice: `resolve_client_ip` directly, and `/v1/verify` through the real app
with a key whose allowlist is exactly the expected client (VALID) and a key whose allowlist holds
only the addresses that must not count as the client (IP_NOT_ALLOWED).

An entry that is not an IP address (`unknown`, `unix:`, host names, CIDRs, unclosed brackets)
where the right-to-left walk looks for the client makes the client unknown, so no allowlist
passes, not even one of the proxies' own addresses: app/net.py's documented rule, which the
contract leaves open (it names the first untrusted *address*). Empty entries and empty headers
are skipped. Neither can make a spoofed address pass an allowlist.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette

from app.net import compile_allowlist, ip_allowed, parse_network, resolve_client_ip
from app.settings import DEFAULT_TRUSTED_PROXIES, Settings
from tests.live import live_server
from tests.support import WorkspaceHandle

SET_ALLOWED_IPS = """mutation($id: ID!, $ips: [String!]!) { setAllowedIps(id: $id, ips: $ips) {
    __typename ... on Error { code message } } }"""


@dataclass(frozen=True)
class Case:
    id: str
    peer: str
    forwarded: tuple[str, ...]  # X-Forwarded-For headers, in the order they are sent
    client: str | None  # the address Keyplane must take as the client; None: unknown
    others: tuple[str, ...] = ()  # allowlist entries that must NOT match (spoofs, proxies)


UNTRUSTED = "203.0.113.10"  # the default `client` fixture's peer
PROXY = "10.0.0.5"

CASES = [
    # An untrusted peer's X-Forwarded-For is ignored whatever it says.
    Case("untrusted-peer", UNTRUSTED, ("198.51.100.7",), UNTRUSTED, ("198.51.100.7",)),
    Case("untrusted-claims-private", UNTRUSTED, ("10.0.0.9",), UNTRUSTED, ("10.0.0.0/8",)),
    Case(
        "untrusted-several-headers",
        UNTRUSTED,
        ("198.51.100.7", "127.0.0.1, 10.0.0.2"),
        UNTRUSTED,
        ("198.51.100.7", "127.0.0.1", "10.0.0.2"),
    ),
    Case("untrusted-v6-peer", "2001:db8::99", ("198.51.100.7",), "2001:db8::99", ("198.51.100.7",)),
    # Behind a trusted proxy.
    Case("trusted-no-header", PROXY, (), PROXY),
    Case("trusted-empty-header", PROXY, ("",), PROXY),
    Case("trusted-blank-entries", PROXY, (" , ,",), PROXY),
    Case("one-proxy", PROXY, ("198.51.100.7",), "198.51.100.7", (PROXY,)),
    Case(
        "spoof-then-real",
        PROXY,
        ("203.0.113.66, 198.51.100.7",),
        "198.51.100.7",
        ("203.0.113.66", PROXY),
    ),
    Case(
        "injected-several-leftmost",
        PROXY,
        ("192.0.2.1, 203.0.113.66, 198.51.100.7",),
        "198.51.100.7",
        ("192.0.2.1", "203.0.113.66"),
    ),
    Case(
        "injected-private-leftmost",
        PROXY,
        ("10.9.9.9, 198.51.100.7",),
        "198.51.100.7",
        ("10.9.9.9", PROXY),
    ),
    Case(
        "several-headers-in-order",
        PROXY,
        ("203.0.113.66", "198.51.100.7"),
        "198.51.100.7",
        ("203.0.113.66",),
    ),
    Case(
        "several-headers-order-matters",
        PROXY,
        ("198.51.100.7", "203.0.113.66"),
        "203.0.113.66",
        ("198.51.100.7",),
    ),
    Case(
        "several-headers-trusted-tail",
        "10.0.0.4",
        ("203.0.113.66, 198.51.100.7", "10.0.0.2", "10.0.0.3"),
        "198.51.100.7",
        ("203.0.113.66", "10.0.0.2", "10.0.0.3", "10.0.0.4"),
    ),
    Case(
        "trusted-chain",
        "10.0.0.4",
        ("198.51.100.7, 10.0.0.2, 10.0.0.3",),
        "198.51.100.7",
        ("10.0.0.2", "10.0.0.3", "10.0.0.4"),
    ),
    Case(
        "every-private-range",
        "127.0.0.1",
        ("203.0.113.66, 198.51.100.7, 192.168.1.1, 172.16.0.1, 10.1.2.3, fd00::2",),
        "198.51.100.7",
        ("203.0.113.66", "192.168.0.0/16", "172.16.0.0/12", "10.0.0.0/8", "fc00::/7"),
    ),
    Case("ipv6-loopback-peer", "::1", ("198.51.100.7",), "198.51.100.7", ("::1",)),
    # Every entry trusted: the first (leftmost) one.
    Case(
        "all-trusted-chain",
        "10.0.0.4",
        ("10.0.0.1, 10.0.0.2, 10.0.0.3",),
        "10.0.0.1",
        ("10.0.0.2", "10.0.0.3", "10.0.0.4"),
    ),
    Case("all-trusted-single", "127.0.0.1", ("192.168.1.20",), "192.168.1.20", ("127.0.0.1",)),
    Case(
        "all-trusted-mixed-families",
        "::1",
        ("fd00::7, 10.0.0.2",),
        "fd00::7",
        ("10.0.0.2", "::1"),
    ),
    # Address forms.
    Case("ipv6-client", PROXY, ("2001:db8::1",), "2001:db8::1", (PROXY,)),
    Case(
        "ipv6-spoof-and-proxies",
        "::1",
        ("2001:db8::66, 2001:db8::1, fd00::2",),
        "2001:db8::1",
        ("2001:db8::66", "fd00::2"),
    ),
    Case("bracketed-ipv6-port", PROXY, ("[2001:db8::1]:443",), "2001:db8::1", (PROXY,)),
    Case("ipv4-port", PROXY, ("198.51.100.7:5555",), "198.51.100.7", (PROXY,)),
    Case(
        "ports-everywhere",
        "10.0.0.4",
        ("203.0.113.66:80, 198.51.100.7:5555, 10.0.0.2:8080, [fd00::2]:443",),
        "198.51.100.7",
        ("203.0.113.66", "10.0.0.2", "fd00::2"),
    ),
    Case("ipv4-mapped-ipv6", PROXY, ("::ffff:198.51.100.7",), "198.51.100.7", (PROXY,)),
    Case(
        "ipv4-mapped-trusted-hop",
        PROXY,
        ("198.51.100.7, ::ffff:10.0.0.9",),
        "198.51.100.7",
        ("10.0.0.9",),
    ),
    # Entries that are not addresses: never the client, never let what is left of them pass.
    Case("garbage-only", PROXY, ("unknown",), None, (PROXY,)),
    Case("unix-socket-hop", PROXY, ("unix:",), None, (PROXY, "10.0.0.0/8")),
    Case(
        "garbage-right-of-spoof", PROXY, ("198.51.100.7, unknown",), None, ("198.51.100.7", PROXY)
    ),
    Case(
        "garbage-between",
        "10.0.0.4",
        ("198.51.100.7, not-an-ip, 10.0.0.3",),
        None,
        ("198.51.100.7", "10.0.0.3", "10.0.0.4"),
    ),
    Case("garbage-left-of-client", PROXY, ("unknown, 198.51.100.7",), "198.51.100.7", (PROXY,)),
    Case(
        "garbage-left-of-trusted",
        "10.0.0.4",
        ("not-an-ip, 10.0.0.2, 10.0.0.3",),
        None,
        ("10.0.0.2", "10.0.0.3", "10.0.0.4"),
    ),
    Case(
        "hostname",
        PROXY,
        ("198.51.100.7, client.example.com",),
        None,
        ("198.51.100.7", PROXY),
    ),
    Case("cidr-entry", PROXY, ("198.51.100.0/24",), None, ("198.51.100.0/24", PROXY)),
    Case("unclosed-bracket", PROXY, ("[2001:db8::1",), None, ("2001:db8::/32", PROXY)),
    Case(
        "space-not-comma",
        PROXY,
        ("203.0.113.66 198.51.100.7",),
        None,
        ("203.0.113.66", "198.51.100.7", PROXY),
    ),
    Case(
        "leading-zeros",
        PROXY,
        ("198.051.100.007",),
        None,
        ("198.51.100.7", "198.41.100.7", PROXY),
    ),
    Case(
        "empty-entry-skipped",
        "10.0.0.4",
        ("198.51.100.7,, 10.0.0.3",),
        "198.51.100.7",
        ("10.0.0.3", "10.0.0.4"),
    ),
    Case(
        "empty-header-among-headers",
        PROXY,
        ("203.0.113.66", "", "198.51.100.7"),
        "198.51.100.7",
        ("203.0.113.66",),
    ),
]


def _ids(cases: list[Case]) -> list[str]:
    return [case.id for case in cases]


@pytest.fixture(scope="module")
def trusted() -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(parse_network(p) for p in DEFAULT_TRUSTED_PROXIES)


def test_the_matrix_runs_with_the_default_trusted_proxies(
    settings: Settings, trusted: tuple[object, ...]
) -> None:
    assert settings.trusted_proxies == trusted
    assert os.environ.get("KEYPLANE_TRUSTED_PROXIES") is None


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_resolve_client_ip(
    case: Case, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> None:
    resolved = resolve_client_ip(case.peer, list(case.forwarded), trusted)
    if case.client is None:
        assert resolved is None
        assert not ip_allowed(resolved, compile_allowlist(["0.0.0.0/0", "::/0"]))
    else:
        assert resolved == ipaddress.ip_address(case.client)
        assert ip_allowed(resolved, compile_allowlist([case.client]))
    for other in case.others:
        assert not ip_allowed(resolved, compile_allowlist([other])), other


def test_resolve_client_ip_without_a_usable_peer(
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> None:
    # No peer (e.g. a Unix socket) or one that is not an IP: unknown, so no allowlist passes.
    for peer in (None, "", "unix-socket", "[::1"):
        resolved = resolve_client_ip(peer, ["198.51.100.7"], trusted)
        assert resolved is None, peer
        assert not ip_allowed(resolved, compile_allowlist(["0.0.0.0/0", "::/0"]))
    # An IPv4-mapped trusted peer is the same trusted peer.
    resolved = resolve_client_ip("::ffff:10.0.0.5", ["198.51.100.7"], trusted)
    assert resolved == ipaddress.ip_address("198.51.100.7")


async def _verify_from(
    app: Starlette, peer: str, secret: str, forwarded: tuple[str, ...]
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        headers = [("X-API-Key", secret)] + [("X-Forwarded-For", f) for f in forwarded]
        return await client.get("/v1/verify", headers=headers)


async def _key_allowing(ws: WorkspaceHandle, ips: list[str]) -> str:
    key_id, secret = await ws.create_key()
    data = await ws.q(SET_ALLOWED_IPS, {"id": key_id, "ips": ips})
    assert data["setAllowedIps"]["__typename"] != "ValidationFailedError", data
    return secret


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
async def test_verify_uses_the_resolved_client_for_the_allowlist(
    app: Starlette, ws: WorkspaceHandle, case: Case
) -> None:
    if case.client is None:  # unknown: even an allowlist of every address refuses
        secret = await _key_allowing(ws, ["0.0.0.0/0", "::/0"])
        response = await _verify_from(app, case.peer, secret, case.forwarded)
        assert response.json()["code"] == "IP_NOT_ALLOWED", response.text
    else:
        secret = await _key_allowing(ws, [case.client])
        response = await _verify_from(app, case.peer, secret, case.forwarded)
        assert (response.status_code, response.json()["code"]) == (200, "VALID"), response.text
    if not case.others:
        return
    secret = await _key_allowing(ws, list(case.others))
    response = await _verify_from(app, case.peer, secret, case.forwarded)
    body = response.json()
    assert (response.status_code, body["code"]) == (403, "IP_NOT_ALLOWED"), response.text
    assert body["message"] == "IP address not allowed" and body["valid"] is False


async def test_an_empty_allowlist_does_not_depend_on_the_headers(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    _, secret = await ws.create_key()
    for peer, forwarded in [(UNTRUSTED, ("unknown",)), (PROXY, ("not-an-ip",)), ("::1", ())]:
        response = await _verify_from(app, peer, secret, forwarded)
        assert response.json()["code"] == "VALID"


# --- the live server (`keyplane serve`, i.e. uvicorn) ---------------------------------------
# The live server's peer here is 127.0.0.1.

LIVE_CASES = [
    (None, "127.0.0.1"),
    ("203.0.113.66, 198.51.100.7", "198.51.100.7"),
    ("198.51.100.7, 10.0.0.2, 10.0.0.3", "198.51.100.7"),
    ("10.0.0.1, 10.0.0.2", "10.0.0.1"),
]


async def _live_code(base_url: str, secret: str, forwarded: str | None) -> str:
    headers = {"X-API-Key": secret}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
        response = await client.get("/v1/verify", headers=headers)
    code: str = response.json()["code"]
    return code


@pytest.mark.slow
async def test_live_server_with_default_trust_resolves_like_the_app(
    ws: WorkspaceHandle, database_url: str
) -> None:
    keys = [
        (forwarded, await _key_allowing(ws, [client]), await _key_allowing(ws, ["203.0.113.66"]))
        for forwarded, client in LIVE_CASES
    ]
    with live_server(database_url) as base_url:
        for forwarded, client_key, spoof_key in keys:
            assert await _live_code(base_url, client_key, forwarded) == "VALID", forwarded
            assert await _live_code(base_url, spoof_key, forwarded) == "IP_NOT_ALLOWED", forwarded


@pytest.mark.slow
async def test_live_server_ignores_forwarded_for_from_an_untrusted_loopback_peer(
    ws: WorkspaceHandle, database_url: str
) -> None:
    spoofed = await _key_allowing(ws, ["198.51.100.7"])
    local = await _key_allowing(ws, ["127.0.0.1"])
    env = {"KEYPLANE_TRUSTED_PROXIES": "10.0.0.0/8"}  # only the load balancers, not loopback
    with live_server(database_url, extra_env=env) as base_url:
        # CONTRACT §4: the peer 127.0.0.1 is not a trusted proxy, so its header is ignored.
        assert await _live_code(base_url, local, None) == "VALID"
        assert await _live_code(base_url, spoofed, "198.51.100.7") == "IP_NOT_ALLOWED"
        assert await _live_code(base_url, local, "198.51.100.7") == "VALID"
