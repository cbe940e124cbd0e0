"""`/graphql`: authenticate the caller, then hand the request to Strawberry.

Authentication happens here, before any GraphQL execution, so that missing or bad credentials
get a real HTTP 401 (and too many failures a 429) with the contract's JSON body. Only a document
made solely of `login` or `acceptInvite` (and, when enabled, introspection) runs without a
bearer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from graphql import GraphQLError, OperationDefinitionNode, parse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send
from strawberry.asgi import GraphQL

from app.db import DATABASE_ERRORS, UNAVAILABLE_MESSAGE
from app.http.graphiql import graphiql_page
from app.net import resolve_client_ip
from app.services import Services
from app.services.auth import FailureLimiter, authenticate
from resolvers.context import Context

PUBLIC_FIELDS = frozenset({"login", "acceptInvite"})
INTROSPECTION_FIELDS = frozenset({"__schema", "__type", "__typename"})
CONTEXT_KEY = "keyplane_context"

logger = logging.getLogger("keyplane.graphql")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"errors": [{"message": message, "extensions": {"code": code}}]}, status)


def _top_level_fields(payload: Any) -> set[str] | None:
    """The root field names a request asks for, or None if the request cannot be read."""
    documents = payload if isinstance(payload, list) else [payload]
    names: set[str] = set()
    for item in documents:
        if not isinstance(item, dict) or not isinstance(item.get("query"), str):
            return None
        try:
            document = parse(item["query"], max_tokens=5000)
        except GraphQLError:
            return None
        for definition in document.definitions:
            if not isinstance(definition, OperationDefinitionNode):
                return None  # fragments could hide fields; such a document needs a bearer
            for selection in definition.selection_set.selections:
                name = getattr(selection, "name", None)
                if name is None:
                    return None
                names.add(name.value)
    return names


class KeyplaneGraphQL(GraphQL[Context, None]):
    """Strawberry's ASGI view, given the context the gate prepared. The gate serves GraphiQL
    itself (Strawberry's page loads it from a CDN; ours ships the assets)."""

    async def get_context(self, request: Any, response: Any) -> Context:
        context: Context = request.scope["state"][CONTEXT_KEY]
        return context


class GraphQLEndpoint:
    """The ASGI app mounted at /graphql."""

    def __init__(
        self,
        view: KeyplaneGraphQL,
        services: Services,
        limiter: FailureLimiter,
        *,
        graphiql: bool,
        introspection: bool,
    ) -> None:
        self.view = view
        self.services = services
        self.limiter = limiter
        self.graphiql = graphiql
        self.public_fields = PUBLIC_FIELDS | (INTROSPECTION_FIELDS if introspection else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        if request.method == "GET":
            response: Response
            if self.graphiql and "text/html" in request.headers.get("accept", ""):
                response = graphiql_page()
            else:
                response = _error(404, "NOT_FOUND", "Send GraphQL operations with POST")
            await response(scope, receive, send)
            return
        settings = self.services.settings
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            await _too_large(settings.max_body_bytes)(scope, receive, send)
            return
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_body_bytes:
                await _too_large(settings.max_body_bytes)(scope, receive, send)
                return
        client = scope.get("client")
        client_ip = resolve_client_ip(
            client[0] if client else None,
            request.headers.getlist("x-forwarded-for"),
            settings.trusted_proxies,
        )
        ip_text = str(client_ip) if client_ip else "unknown"
        try:
            payload = json.loads(body)
            fields = _top_level_fields(payload)
        except (ValueError, RecursionError):
            payload, fields = None, None
        if (where := _not_unicode(payload, "request")) is not None:
            # A JSON escape of half a surrogate pair ("\ud800") is valid JSON but not text: no
            # database, hash or response can hold it. Named by its place, never by its value
            # (it may be a password).
            await _error(
                400, "VALIDATION_FAILED", f"{where} is not valid Unicode text (a lone surrogate)"
            )(scope, receive, send)
            return
        if isinstance(payload, dict) and payload.get("operationName") == "":
            # GraphiQL sends "" for an anonymous operation; it means "no name", not a name.
            payload["operationName"] = None
            body = json.dumps(payload).encode()
        needs_auth = fields is None or not fields <= self.public_fields
        bearer = _bearer(request.headers.get("authorization"))
        principal = None
        # Every POST may authenticate (a bearer or a login), so a client IP over its failure
        # budget is refused before any of them is tried.
        if self.limiter.blocked(ip_text):
            await _error(429, "RATE_LIMITED", "Too many failed authentications; try again later")(
                scope, receive, send
            )
            return
        login_only = fields is not None and fields <= PUBLIC_FIELDS
        if needs_auth or (bearer is not None and not login_only):
            if bearer is None:
                await _error(401, "UNAUTHENTICATED", "Missing bearer token")(scope, receive, send)
                return
            try:
                principal = await authenticate(bearer, self.services.clock.now())
            except DATABASE_ERRORS as exc:
                # Not the caller's fault, and no stack trace of a plain 500: a typed 503, as
                # /v1/verify answers when it cannot decide.
                logger.warning("authentication: database unreachable (%s)", type(exc).__name__)
                await _error(503, "UNAVAILABLE", UNAVAILABLE_MESSAGE)(scope, receive, send)
                return
            if principal is None:
                self.limiter.record_failure(ip_text)
                await _error(401, "UNAUTHENTICATED", "Invalid or expired bearer token")(
                    scope, receive, send
                )
                return
        scope.setdefault("state", {})[CONTEXT_KEY] = Context(
            services=self.services,
            principal=principal,
            client_ip=ip_text,
            bearer=bearer,
            on_auth_failure=lambda: self.limiter.record_failure(ip_text),
        )
        await self.view(scope, _replay(body, receive), send)


def _not_unicode(value: Any, path: str) -> str | None:
    """The place of the first string (or object key) in a parsed JSON body that is not valid
    Unicode, or None. Iterative, so no nesting depth json.loads accepts can overflow it."""
    pending: list[tuple[Any, str]] = [(value, path)]
    while pending:
        item, place = pending.pop()
        if isinstance(item, str):
            if not _is_text(item):
                return place
        elif isinstance(item, dict):
            for key, inner in item.items():
                if not _is_text(key):
                    return f"{place} (an object key)"
                pending.append((inner, f"{place}.{key}"))
        elif isinstance(item, list):
            pending.extend((inner, f"{place}[{index}]") for index, inner in enumerate(item))
    return None


def _is_text(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return ""  # present but unusable: treated as bad credentials
    return value.strip()


def _too_large(limit: int) -> JSONResponse:
    return _error(413, "PAYLOAD_TOO_LARGE", f"Request body exceeds {limit} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
