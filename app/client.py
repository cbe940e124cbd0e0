"""A small client for services: verify keys against Keyplane, or protect an ASGI app.

    from app.client import KeyplaneClient, KeyplaneAuthMiddleware
    result = KeyplaneClient("http://keyplane:8000").verify(token, permissions=["pdf.generate"])
    app = KeyplaneAuthMiddleware(app, base_url="http://keyplane:8000",
                                 required_permissions=["pdf.generate"])

The optional positive cache (`cache_seconds`, default 0 = off) skips the round trip for a key
verified VALID within the last few seconds. The trade-off: a key revoked or disabled in
Keyplane keeps passing in this client for up to `cache_seconds`. Refusals are never cached.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

UNAVAILABLE_MESSAGE = "Keyplane could not be reached"


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


class _PositiveCache:
    """VALID answers for a few seconds, keyed by a hash of (token, permissions, ip, origin)."""

    def __init__(self, seconds: float, max_entries: int = 10_000) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, VerifyResult]] = OrderedDict()

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
        if entry[0] < time.monotonic():
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: str, result: VerifyResult) -> None:
        if self.seconds <= 0 or not result.valid:
            return
        self._entries[key] = (time.monotonic() + self.seconds, result)
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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._cache = _PositiveCache(cache_seconds)
        self._transport = transport
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None

    @staticmethod
    def _request(
        token: str, permissions: Sequence[str] | None, ip: str | None, origin: str | None
    ) -> tuple[dict[str, str], dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"}
        if ip:
            headers["X-Forwarded-For"] = ip
        if origin:
            headers["Origin"] = origin
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
        if scope["type"] != "http":
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
            payload = json.dumps(result.body).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": result.status_code,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        scope.setdefault("state", {})["keyplane"] = result
        await self.app(scope, receive, send)
