"""The app factory: `create_app(settings)` builds the whole HTTP application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from tortoise.contrib.starlette import RegisterTortoise

from app import log_policy
from app.activity import ActivityRecorder
from app.cache import KeyCache
from app.changes import ChangeFeed
from app.clock import Clock, SystemClock
from app.db import missing_migrations, tortoise_config
from app.gcpolicy import GcPolicy
from app.http.graphiql import ASSETS_PATH, graphiql_assets
from app.http.graphql import GraphQLEndpoint, KeyplaneGraphQL
from app.http.health import health
from app.http.verify import VerifyEndpoint
from app.hugepages import HeapPages
from app.invalidation import Listener, Notifier, new_origin
from app.metrics import Metrics, metrics_endpoint
from app.services import Services
from app.services.auth import FailureLimiter
from app.settings import Settings
from app.usage import UsageRecorder
from resolvers.schema import build_schema

VERIFY_PATH = "/v1/verify"
VERIFY_METHODS = frozenset({"GET", "POST", "HEAD"})  # what its Route answers (HEAD with GET)


class KeyplaneApp(Starlette):
    """The Starlette app, with `/v1/verify` answered before Starlette's middleware and router.

    The verify endpoint is the hot path and needs neither: it is a plain ASGI callable that
    never raises for a bad request (an exception would be a bug, and uvicorn then answers 500
    and logs it, as Starlette's ServerErrorMiddleware would). Anything else, including other
    methods on `/v1/verify` (405) and a mounted `root_path`, goes through the router as before.
    """

    verify: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.verify is not None
            and scope["type"] == "http"
            and scope["path"] == VERIFY_PATH
            and scope["method"] in VERIFY_METHODS
            and not scope.get("root_path")
        ):
            await self.verify(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None, *, clock: Clock | None = None) -> Starlette:
    """Build the Keyplane ASGI app. Tests pass their own settings and clock."""
    settings = settings or Settings.from_env()
    log_policy.install()
    services = Services(settings=settings, clock=clock or SystemClock(), changes=ChangeFeed())
    schema = build_schema(introspection=settings.introspection)
    view = KeyplaneGraphQL(schema, graphql_ide=None, allow_queries_via_get=False)
    graphql = GraphQLEndpoint(
        view,
        services,
        FailureLimiter(settings.auth_failure_limit, settings.auth_failure_window_seconds),
        graphiql=settings.graphiql,
        introspection=settings.introspection,
    )

    key_cache = KeyCache(settings)
    services.changes.subscribe(key_cache)
    origin = new_origin()  # names this app's NOTIFYs, so its own listener skips them
    if settings.is_postgres:
        services.changes.subscribe(Notifier(origin))
    activity = ActivityRecorder(settings, services.clock)
    usage = UsageRecorder(settings, services.clock)
    metrics = Metrics()
    gc_policy = GcPolicy(min(settings.cache_refresh_seconds, 10.0))
    heap_pages = HeapPages(settings.huge_pages)
    verify = VerifyEndpoint(settings, key_cache, services.clock, activity, usage, metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with RegisterTortoise(app, config=tortoise_config(settings.database_url)):
            missing = await missing_migrations()
            if missing:
                # Every query of this version would fail on the older schema (a verify would
                # answer UNAVAILABLE while /governance/health said ok).
                raise RuntimeError(
                    f"the database lacks {len(missing)} of this version's migrations (from "
                    f"{missing[0]}): run `keyplane migrate` first"
                )
            await activity.start()
            await usage.start()
            await key_cache.start()
            await gc_policy.start()
            await heap_pages.start()
            listener = None
            if settings.is_postgres:
                listener = Listener(settings.database_url, key_cache, origin)
                await listener.start()
            try:
                yield
            finally:
                if listener is not None:
                    await listener.stop()
                await heap_pages.stop()
                await gc_policy.stop()
                await key_cache.stop()
                await usage.stop()
                await activity.stop()

    # CORS wraps /graphql only: a preflight-shaped request that a gateway forwards to
    # /v1/verify must reach the verifier, never be answered 200 by the CORS layer.
    graphql_app: ASGIApp = graphql
    graphql_methods = ["GET", "POST"]
    if settings.cors_origins:
        graphql_app = CORSMiddleware(
            graphql,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=True,
            max_age=600,
        )
        graphql_methods.append("OPTIONS")
    app = KeyplaneApp(
        routes=[
            Route("/graphql", graphql_app, methods=graphql_methods),
            Route(VERIFY_PATH, verify, methods=["GET", "POST"]),
            # Gateways that append the original path and keep its method (Envoy ext_authz
            # `path_prefix`); no `methods`: every method reaches the check.
            Route("/v1/verify/{rest:path}", verify.gateway_view()),
            Route("/governance/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Mount(ASSETS_PATH, app=graphiql_assets(), name="graphiql-assets"),
        ],
        lifespan=lifespan,
    )
    app.verify = verify
    app.state.services = services
    app.state.settings = settings
    app.state.key_cache = key_cache
    app.state.notice_origin = origin
    app.state.activity = activity
    app.state.usage = usage
    app.state.metrics = metrics
    return app


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory` (what `keyplane serve` runs in each worker)."""
    return create_app(Settings.from_env())
