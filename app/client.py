"""A small client for services: verify keys against Keyplane, or protect an ASGI app.

    from app.client import KeyplaneClient, KeyplaneAuthMiddleware
    result = KeyplaneClient("http://keyplane:8000").verify(token, permissions=["pdf.generate"])
    app = KeyplaneAuthMiddleware(app, base_url="http://keyplane:8000",
                                 required_permissions=["pdf.generate"])

The optional positive cache (`cache_seconds`, default 0 = off, at most
`MAX_CACHE_SECONDS`) skips the round trip for a key verified VALID within the last few seconds.
The trade-off: a key revoked or disabled in Keyplane keeps passing in this client for up to
`cache_seconds`. An answer is never kept past the key's own `expiresAt` or `graceEndsAt`, and
refusals are never cached.

A token that is not ASCII is refused here as INVALID_KEY without a round trip: no Keyplane
token has such a character, and it cannot be sent in a header.

The middleware checks WebSocket handshakes as it checks HTTP requests: a refused handshake is
answered with Keyplane's status and body where the server supports the ASGI denial response,
and closed with code 1008 (policy violation) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

UNAVAILABLE_MESSAGE = "Keyplane could not be reached"
MAX_CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class VerifyResult:
    """Keyplane's answer for one key."""

    valid: bool
    code: str
    message: str
    status_code: int
    key_id: str | None = None
    key_type: str | None = None
    environment_id: str | None = None
    workspace_id: str | None = None
    permissions: list[str] = field(default_factory=list)
    expires_at: str | None = None
    grace_ends_at: str | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_response(cls, status_code: int, body: dict[str, Any]) -> VerifyResult:
        return cls(
            valid=bool(body.get("valid")),
            code=str(body.get("code", "UNAVAILABLE")),
            message=str(body.get("message", "")),
            status_code=status_code,
            key_id=body.get("keyId"),
            key_type=body.get("keyType"),
            environment_id=body.get("environmentId"),
            workspace_id=body.get("workspaceId"),
            permissions=list(body.get("permissions") or []),
            expires_at=body.get("expiresAt"),
            grace_ends_at=body.get("graceEndsAt"),
            body=body,
        )

    @classmethod
    def unavailable(cls) -> VerifyResult:
        body = {"valid": False, "code": "UNAVAILABLE", "message": UNAVAILABLE_MESSAGE}
        return cls.from_response(503, body)

    @classmethod
    def invalid_key(cls) -> VerifyResult:
        """Keyplane's own answer for a token that cannot be a key (the same body it sends)."""
        return cls.from_response(
            401, {"valid": False, "code": "INVALID_KEY", "message": "Invalid API key"}
        )

    def ends_at(self) -> float | None:
        """The earliest of `expiresAt` and `graceEndsAt` as a Unix time; None when neither is
        set. A value that cannot be read counts as already passed."""
        ends: float | None = None
        for text in (self.expires_at, self.grace_ends_at):
            if not text:
                continue
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            except (TypeError, ValueError, OverflowError):
                moment = -math.inf
            ends = moment if ends is None else min(ends, moment)
        return ends


class _PositiveCache:
    """VALID answers for a few seconds, keyed by a hash of (token, permissions, ip, origin)."""

    def __init__(
        self, seconds: float, max_entries: int = 10_000, clock: Callable[[], float] = time.time
    ) -> None:
        if (
            not isinstance(seconds, (int, float))
            or isinstance(seconds, bool)
            or not 0 <= seconds <= MAX_CACHE_SECONDS
        ):
            raise ValueError(
                f"cache_seconds must be a number from 0 to {MAX_CACHE_SECONDS:g}, got {seconds!r}"
            )
        self.seconds = float(seconds)
        self.clock = clock
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, float | None, VerifyResult]] = OrderedDict()

    @staticmethod
    def key(token: str, permissions: Sequence[str], ip: str | None, origin: str | None) -> str:
        # Hash so the cache never holds a token in the clear.
        raw = json.dumps([token, sorted(permissions), ip, origin])
        return hashlib.sha256(raw.encode()).hexdigest()

    def get(self, key: str) -> VerifyResult | None:
        if self.seconds <= 0:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        monotonic_end, wall_end, result = entry
        if monotonic_end < time.monotonic() or (wall_end is not None and wall_end <= self.clock()):
            del self._entries[key]
            return None
        return result

    def put(self, key: str, result: VerifyResult) -> None:
        if self.seconds <= 0 or not result.valid:
            return
        # The key's own end (expiry, or the end of a revoked key's grace) bounds the entry by
        # the wall clock, so a cached VALID never outlives what Keyplane would answer.
        wall_end = result.ends_at()
        if wall_end is not None and wall_end <= self.clock():
            return
        self._entries[key] = (time.monotonic() + self.seconds, wall_end, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class KeyplaneClient:
    """Calls `POST /v1/verify`. `verify` is synchronous; `verify_async` is for async code."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 2.0,
        cache_seconds: float = 0.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (Unix seconds) is the time a cached answer's `expiresAt` and `graceEndsAt`
        are compared with."""
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._cache = _PositiveCache(cache_seconds, clock=clock)
        self._transport = transport
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None

    @staticmethod
    def _request(
        token: str, permissions: Sequence[str] | None, ip: str | None, origin: str | None
    ) -> tuple[dict[bytes, bytes], dict[str, Any]]:
        # Header values go as bytes: an Origin an ASGI server decoded as Latin-1 is sent back
        # as the same bytes, where httpx would refuse a str that is not ASCII.
        headers = {b"authorization": f"Bearer {token}".encode("ascii")}
        if ip:
            headers[b"x-forwarded-for"] = _header_bytes(ip)
        if origin:
            headers[b"origin"] = _header_bytes(origin)
        return headers, {"permissions": list(permissions or [])}

    @staticmethod
    def _result(response: httpx.Response) -> VerifyResult:
        try:
            body = response.json()
        except ValueError:
            return VerifyResult.unavailable()
        if not isinstance(body, dict) or "code" not in body:
            return VerifyResult.unavailable()
        return VerifyResult.from_response(response.status_code, body)

    def verify(
        self,
        token: str,
        permissions: Sequence[str] | None = None,
        ip: str | None = None,
        origin: str | None = None,
    ) -> VerifyResult:
        """Verify a key; a Keyplane that cannot be reached gives UNAVAILABLE, never VALID."""
        if not _sendable(token):
            return VerifyResult.invalid_key()
        cache_key = self._cache.key(token, permissions or [], ip, origin)
        if (cached := self._cache.get(cache_key)) is not None:
            return cached
        if self._sync is None:
            self._sync = httpx.Client(base_url=self.base_url, timeout=self.timeout)
        headers, body = self._request(token, permissions, ip, origin)
        try:
            response = self._sync.post("/v1/verify", headers=headers, json=body)
        except httpx.HTTPError:
            return VerifyResult.unavailable()
        result = self._result(response)
        self._cache.put(cache_key, result)
        return result

    async def verify_async(
        self,
        token: str,
        permissions: Sequence[str] | None = None,
        ip: str | None = None,
        origin: str | None = None,
    ) -> VerifyResult:
        """The same as `verify`, without blocking the event loop."""
        if not _sendable(token):
            return VerifyResult.invalid_key()
        cache_key = self._cache.key(token, permissions or [], ip, origin)
        if (cached := self._cache.get(cache_key)) is not None:
            return cached
        if self._async is None:
            self._async = httpx.AsyncClient(
                base_url=self.base_url, timeout=self.timeout, transport=self._transport
            )
        headers, body = self._request(token, permissions, ip, origin)
        try:
            response = await self._async.post("/v1/verify", headers=headers, json=body)
        except httpx.HTTPError:
            return VerifyResult.unavailable()
        result = self._result(response)
        self._cache.put(cache_key, result)
        return result

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None


def _sendable(token: str) -> bool:
    """Whether a token can be sent in a header at all: printable ASCII, as every key is."""
    return token.isascii() and token.isprintable()


def _header_bytes(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


class KeyplaneAuthMiddleware:
    """Protects any ASGI app: refusals are answered with Keyplane's status and body; a valid
    key's result is put on `request.state.keyplane` for the route."""

    def __init__(
        self,
        app: ASGIApp,
        base_url: str,
        required_permissions: Sequence[str] = (),
        *,
        client: KeyplaneClient | None = None,
        cache_seconds: float = 0.0,
    ) -> None:
        self.app = app
        self.required_permissions = list(required_permissions)
        self.client = client or KeyplaneClient(base_url, cache_seconds=cache_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = None
        authorization = _header(scope, b"authorization")
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()
        token = token or _header(scope, b"x-api-key")
        if not token:
            result = VerifyResult.from_response(
                401, {"valid": False, "code": "MISSING_KEY", "message": "No API key in request"}
            )
        else:
            client = scope.get("client")
            result = await self.client.verify_async(
                token,
                self.required_permissions,
                ip=client[0] if client else None,
                origin=_header(scope, b"origin"),
            )
        if not result.valid:
            if scope["type"] == "websocket":
                await _refuse_handshake(scope, receive, send, result)
            else:
                await _send_refusal(send, result, "http.response")
            return
        scope.setdefault("state", {})["keyplane"] = result
        await self.app(scope, receive, send)


async def _send_refusal(send: Send, result: VerifyResult, kind: str) -> None:
    """Keyplane's status and JSON body, as `kind` messages (`http.response` or, before a
    WebSocket is accepted, `websocket.http.response`)."""
    payload = json.dumps(result.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": f"{kind}.start", "status": result.status_code, "headers": headers})
    await send({"type": f"{kind}.body", "body": payload})


async def _refuse_handshake(
    scope: Scope, receive: Receive, send: Send, result: VerifyResult
) -> None:
    """Refuse a WebSocket handshake before it is accepted: with Keyplane's status and body
    where the server offers the denial response extension, else by closing (1008), which
    servers answer with 403."""
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await _send_refusal(send, result, "websocket.http.response")
        return
    await send({"type": "websocket.close", "code": 1008})
