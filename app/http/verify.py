"""`GET|POST /v1/verify`: a thin adapter that reads the request, asks the key cache and the
shared verifier (app.verifier), and writes the contract's response. No secret is ever echoed.

`/v1/verify/<any path>` (any method) is the same check for gateways that append the original
request's path and keep its method (Envoy ext_authz `path_prefix`, Traefik ForwardAuth
`preserveRequestMethod`): its query string counts as on `/v1/verify`, and its body, when one
comes, is the caller's own payload, so it is never read as a verification request. HEAD
answers carry the headers of the GET answer and no body.

This is the hot path, so it is a plain ASGI callable rather than a Starlette endpoint: it reads
the few headers it needs in one pass over the raw list, and writes the response messages itself.
The steps, whichever way the key arrives:

1. token: `Authorization: Bearer`, else `X-API-Key`, else the JSON body's `key` (an empty
   one counts as absent, so the next source is read);
   permissions: all of the body's `permissions`, `X-Required-Permissions` and `?permissions=`
   (each alone is the contract's case; together, every one listed must be held). A POST body
   that could have asked for permissions but cannot be read (not a JSON object, over
   `KEYPLANE_MAX_BODY_BYTES`, or a `permissions` that is not a list of strings) fails closed:
   the verifier refuses it as INSUFFICIENT_PERMISSIONS, after the key's own checks, and the
   message names what was wrong, never the body's content;
   client IP: CONTRACT §4 (app.net.resolve_client_ip, memoised); Origin: normalised or none.
2. a fresh key-cache entry for the token's SHA-256 answers at once (the cache only ever holds
   hashes of well-formed tokens, so a hit has passed the shape and checksum checks);
3. otherwise the verifier's precheck refuses a missing or malformed token without any lookup,
   and only then is the key loaded (one query; unknown tokens are cached briefly as unknown);
4. the verifier decides; usage, activity and metrics are noted in memory (no I/O).
"""

from __future__ import annotations

import copy
import json
import time
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from app.activity import ActivityRecorder
from app.cache import CacheEntry, KeyCache, Unavailable
from app.clock import Clock
from app.metrics import Metrics
from app.net import ClientIpResolver, normalise_origin
from app.settings import Settings
from app.tokens import MAX_TOKEN_LENGTH, hash_secret
from app.usage import UsageRecorder
from app.verifier import (
    Code,
    Decision,
    RequestFacts,
    decide_malformed,
    decide_missing,
    decide_unavailable,
    decide_unknown,
    judge,
    precheck,
)

JSON_HEADERS = (b"content-type", b"application/json")
MEMO_SIZE = 4096
NO_BODY: dict[str, Any] = {}  # read only, never mutated
# The answers to a caller that passed the key's own checks (status, expiry, IP, Origin).
_ASKED_BY_HOLDER = frozenset({Code.VALID, Code.INSUFFICIENT_PERMISSIONS})


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _body_json(raw: bytes) -> tuple[dict[str, Any], str | None]:
    """The body as a JSON object, and what was wrong with it when it is not one."""
    if not raw:
        return {}, None
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return {}, "the request body is not valid JSON"
    if not isinstance(parsed, dict):
        return {}, f"the request body is {_json_kind(parsed)}, not a JSON object"
    return parsed, None


def _json_kind(value: object) -> str:
    """A JSON value's kind, for a message that must not repeat the value itself."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


def _body_permissions(listed: object) -> tuple[tuple[str, ...], str | None]:
    """The body's `permissions` (absent or null: none), or what is wrong with them."""
    if listed is None:
        return (), None
    if not isinstance(listed, list):
        return (), f"the body's permissions is {_json_kind(listed)}, not a list of strings"
    for item in listed:
        if not isinstance(item, str):
            return (), f"the body's permissions list holds {_json_kind(item)}, not only strings"
        if not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (`"\ud800"`): no text can name it
                return (), "the body's permissions list holds a string that is not valid Unicode"
    return tuple(listed), None


def body_of(decision: Decision) -> bytes:
    """The contract's JSON body for a decision."""
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
    return json.dumps(body, separators=(",", ":")).encode()


class VerifyEndpoint:
    """The ASGI app behind `/v1/verify` (and, through `gateway_view`, `/v1/verify/<path>`)."""

    reads_body = True  # False on the gateway view: a body there is the caller's payload

    def __init__(
        self,
        settings: Settings,
        cache: KeyCache,
        clock: Clock,
        activity: ActivityRecorder,
        usage: UsageRecorder,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.clock = clock
        self.activity = activity
        self.usage = usage
        self.metrics = metrics
        self.client_ips = ClientIpResolver(settings.trusted_proxies)
        # Rendered refusals by code and message (a VALID body is kept on its cache entry).
        self._refusal_bodies: dict[tuple[Code, str], bytes] = {}
        self._origins: dict[str, str | None] = {}

    def gateway_view(self) -> VerifyEndpoint:
        """The same endpoint (same cache, recorders and memos) for `/v1/verify/<path>`, which
        never reads a body."""
        view = copy.copy(self)
        view.reads_body = False
        return view

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        authorization = api_key = permissions_header = origin_header = None
        forwarded: list[str] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
            elif name == b"x-required-permissions":
                # Repeated lines are one list (RFC 9110 5.3): each adds requirements, none
                # replaces a gateway's.
                text = value.decode("latin-1")
                permissions_header = f"{permissions_header},{text}" if permissions_header else text
            elif name == b"origin":
                origin_header = value.decode("latin-1")
        method = scope["method"]
        body = NO_BODY
        unreadable: str | None = None  # what kept the body's permissions from being read
        if method == "POST" and self.reads_body:
            body, unreadable = await self._read_body(receive)

        token: str | None = None
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip() or None
        if token is None and api_key:
            token = api_key.strip() or None
        if token is None and isinstance(key := body.get("key"), str):
            token = key.strip() or None  # as a header's value is: the same key either way

        # Every source counts: a caller can add requirements but never replace a gateway's
        # (a gateway that puts them in the query string cannot be overridden by a header).
        required: tuple[str, ...] = ()
        if body:
            required, wrong = _body_permissions(body.get("permissions"))
            unreadable = unreadable or wrong
        if permissions_header:
            required += _split(permissions_header)
        if scope["query_string"]:
            for name, value in parse_qsl(scope["query_string"].decode("latin-1")):
                if name == "permissions":
                    required += _split(value)
        if len(required) > 1:
            required = tuple(dict.fromkeys(required))

        client = scope.get("client")
        address, ip_text = self.client_ips.resolve(client[0] if client else None, tuple(forwarded))
        facts = RequestFacts(
            token=token,
            client_ip=address,
            origin=self._origin(origin_header) if origin_header else None,
            required=required,
            unreadable=unreadable,
        )
        now = self.clock.now()
        decision, entry = await self._decide(facts, now)

        record = decision.record
        if record is not None:
            self.activity.observe_address(
                now=now,
                key=record,
                address=address,
                text=ip_text,
                # What a key was asked for counts only from a caller that passed the key's own
                # checks: a public client-side ID without its Origin could write any number.
                required=facts.required if decision.code in _ASKED_BY_HOLDER else (),
            )
        self.usage.record(
            now=now,
            code=decision.code.value,
            key=record,
            ip=ip_text,
            # One that does not parse is logged as it was sent (the denial log's text is
            # made storable when it is written).
            origin=facts.origin if facts.origin is not None else origin_header,
            message=decision.message,
            # Only a token that passed the shape check can name a workspace by its prefix.
            prefix=token.partition("_")[0] if decision is decide_unknown() and token else None,
        )
        payload = self._render(decision, entry)
        await send(
            {
                "type": "http.response.start",
                "status": decision.http_status,
                "headers": [JSON_HEADERS, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})
        self.metrics.observe_verification(decision.code.value, time.perf_counter() - started)

    async def _decide(
        self, facts: RequestFacts, now: datetime
    ) -> tuple[Decision, CacheEntry | None]:
        """The decision, and the cache entry it came from when it was answered from memory."""
        token = facts.token
        if token is None:
            return decide_missing(), None
        if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            # A token is ASCII by its shape; a JSON body's `\ud800` cannot even be hashed.
            return decide_malformed(), None
        secret_hash = hash_secret(token)
        entry = self.cache.fresh(secret_hash)
        if entry is not None:
            return judge(facts, entry.record, now), entry
        early = precheck(facts)
        if early is not None:
            return early, None
        try:
            record = await self.cache.get(secret_hash)
        except Unavailable:
            return decide_unavailable(), None
        # The entry just filled (when it was stored), so a VALID body is rendered once per fill.
        return judge(facts, record, now), self.cache.holding(secret_hash, record)

    async def _read_body(self, receive: Receive) -> tuple[dict[str, Any], str | None]:
        """The JSON body as a dict (an empty body: none), or what kept it from being read."""
        limit = self.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return {}, "the request body did not arrive whole"  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            more = message.get("more_body", False)
        if size > limit:
            return {}, f"the request body is over {limit} bytes"
        return _body_json(b"".join(chunks))

    def _origin(self, value: str) -> str | None:
        known = self._origins.get(value, False)
        if known is not False:
            return known  # type: ignore[return-value]
        try:
            origin: str | None = normalise_origin(value)
        except ValueError:
            origin = None  # not a valid origin: never authorized
        if len(value) <= 300:
            if len(self._origins) >= MEMO_SIZE:
                self._origins.clear()
            self._origins[value] = origin
        return origin

    def _render(self, decision: Decision, entry: CacheEntry | None) -> bytes:
        if decision.valid:
            if entry is None:
                return body_of(decision)
            if entry.body is None:  # a VALID body depends only on the record: keep it
                entry.body = body_of(decision)
            return entry.body
        marker = (decision.code, decision.message)
        payload = self._refusal_bodies.get(marker)
        if payload is None:
            payload = body_of(decision)
            if len(self._refusal_bodies) >= MEMO_SIZE:
                self._refusal_bodies.clear()
            self._refusal_bodies[marker] = payload
        return payload
