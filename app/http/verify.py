"""`GET|POST /v1/verify`: a thin adapter that reads the request, asks the cache and the shared
verifier, and writes the contract's response. No secret is ever echoed."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.cache import KeyCache, Unavailable
from app.net import normalise_origin, resolve_client_ip
from app.settings import Settings
from app.tokens import hash_secret
from app.verifier import Decision, RequestFacts, decide_unavailable, precheck, verify


def _split(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _body_json(raw: bytes, limit: int) -> dict[str, Any]:
    if not raw or len(raw) > limit:
        return {}
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _token(request: Request, body: dict[str, Any]) -> str | None:
    authorization = request.headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    if api_key := request.headers.get("x-api-key"):
        return api_key.strip() or None
    key = body.get("key")
    return key if isinstance(key, str) and key else None


def _required(request: Request, body: dict[str, Any]) -> tuple[str, ...]:
    permissions = body.get("permissions")
    if isinstance(permissions, list):
        return tuple(p for p in permissions if isinstance(p, str))
    if header := request.headers.get("x-required-permissions"):
        return tuple(_split(header))
    if query := request.query_params.get("permissions"):
        return tuple(_split(query))
    return ()


def _origin(request: Request) -> str | None:
    origin = request.headers.get("origin")
    if not origin:
        return None
    try:
        return normalise_origin(origin)
    except ValueError:
        return None  # not a valid origin: never authorized


def render(decision: Decision) -> Response:
    """The contract's JSON body and HTTP status for a decision."""
    body: dict[str, Any] = {
        "valid": decision.valid,
        "code": decision.code.value,
        "message": decision.message,
    }
    record = decision.record
    if decision.valid and record is not None:
        body.update(
            keyId=record.key_id,
            keyType=record.key_type,
            environmentId=record.environment_id,
            workspaceId=record.workspace_id,
            permissions=list(record.permission_list),
            expiresAt=record.expires_at.isoformat() if record.expires_at else None,
            graceEndsAt=record.grace_ends_at.isoformat() if record.grace_ends_at else None,
        )
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=decision.http_status,
        media_type="application/json",
    )


async def verify_endpoint(request: Request) -> Response:
    """Verify the key in the request; same checks, same order, whichever way it arrives."""
    started = time.perf_counter()
    state = request.app.state
    settings: Settings = state.settings
    cache: KeyCache = state.key_cache
    raw = await request.body() if request.method == "POST" else b""
    body = _body_json(raw, settings.max_body_bytes)
    client = request.client
    client_ip = resolve_client_ip(
        client.host if client else None,
        request.headers.getlist("x-forwarded-for"),
        settings.trusted_proxies,
    )
    facts = RequestFacts(
        token=_token(request, body),
        client_ip=client_ip,
        origin=_origin(request),
        required=_required(request, body),
    )
    now = state.services.clock.now()
    decision = precheck(facts)
    if decision is None:
        assert facts.token is not None
        try:
            record = await cache.get(hash_secret(facts.token))
        except Unavailable:
            decision = decide_unavailable()
        else:
            decision = verify(facts, record, now)
    ip_text = str(client_ip) if client_ip else "unknown"
    state.activity.observe(now=now, key=decision.record, ip=ip_text, required=facts.required)
    state.usage.record(
        now=now,
        code=decision.code.value,
        key=decision.record,
        ip=ip_text,
        origin=facts.origin,
        message=decision.message,
        token=facts.token,
    )
    state.metrics.observe_verification(decision.code.value, time.perf_counter() - started)
    return render(decision)
