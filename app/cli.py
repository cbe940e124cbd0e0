"""The `keyplane` command: migrate, bootstrap, serve, export-schema."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from tortoise import Tortoise

from app.clock import SystemClock
from app.db import migrate, migrate_holding_lock, setup_lock, tortoise_config, transaction
from app.errors import ValidationFailed
from app.settings import Settings, SettingsError

DEFAULT_WORKSPACE = "default"


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"keyplane: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _bootstrap(
    settings: Settings,
    name: str,
    plan: str,
    key_prefix: str,
    only_if_new: bool,
    owner: tuple[str, str] | None = None,
) -> dict[str, str] | None:
    from app.services.members import check_new_password, clean_email, set_owner
    from app.services.workspaces import bootstrap, parse_plan
    from models import Workspace

    # Check everything the user typed before touching the database.
    chosen_plan = parse_plan(plan)
    if owner is not None:
        clean_email(owner[0])
        check_new_password(owner[1])
    # Under the setup lock: processes bootstrapping one workspace at once create it once.
    async with setup_lock(settings.database_url):
        await migrate_holding_lock(settings.database_url)
        await Tortoise.init(config=tortoise_config(settings.database_url))
        try:
            if only_if_new and await Workspace.exists(name=name):
                return None
            now = SystemClock().now()
            # One transaction: an owner that cannot be set (an email of another workspace)
            # leaves no workspace, environment or token behind.
            async with transaction():
                result = await bootstrap(name, chosen_plan, key_prefix, now)
                if owner is not None:
                    await set_owner(result.workspace, owner[0], owner[1], now)
            return {"workspaceId": result.workspace.public_id, "token": result.token}
        finally:
            await Tortoise.close_connections()


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings()
    asyncio.run(migrate(settings.database_url))
    print("migrations applied", file=sys.stderr)
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    settings = _settings()
    owner = None
    if args.email is not None:
        # The password comes from the first line of stdin, never from argv (visible in ps).
        password = sys.stdin.readline().rstrip("\r\n")
        owner = (args.email, password)
    try:
        out = asyncio.run(
            _bootstrap(settings, args.workspace, args.plan, args.key_prefix, False, owner)
        )
    except ValidationFailed as exc:
        print(f"keyplane bootstrap: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


def cmd_bootstrap_default(args: argparse.Namespace) -> int:
    """First start of `make run`: create the default workspace once and show its admin token."""
    settings = _settings()
    out = asyncio.run(_bootstrap(settings, DEFAULT_WORKSPACE, "GROWTH", "kp", True))
    if out is None:
        print(
            f"Workspace {DEFAULT_WORKSPACE!r} already exists. Mint another admin token with:\n"
            f"  .venv/bin/keyplane bootstrap --workspace {DEFAULT_WORKSPACE}",
            file=sys.stderr,
        )
        return 0
    print(
        "\n".join(
            [
                "",
                f"Created workspace {DEFAULT_WORKSPACE!r} ({out['workspaceId']}).",
                "Its admin token is shown ONCE; store it now:",
                "",
                f"  {out['token']}",
                "",
                "GraphiQL: open http://127.0.0.1:8000/graphql and add this header:",
                f'  {{"Authorization": "Bearer {out["token"]}"}}',
                "",
            ]
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _settings()
    if args.workers > 1 and not settings.is_postgres:
        print(
            "keyplane serve: --workers above 1 needs PostgreSQL (KEYPLANE_DATABASE_URL="
            "postgres://…). With SQLite each worker would keep its own key cache and could "
            "not hear another worker's revocations, so it is refused.",
            file=sys.stderr,
        )
        return 2
    # uvicorn re-raises the SIGTERM it handled once the graceful shutdown (which flushes the
    # usage buffers) is done; exit 0 then, as a clean stop should.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "app.main:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        # Keyplane resolves the client IP itself (KEYPLANE_TRUSTED_PROXIES); uvicorn's own
        # X-Forwarded-For rewriting would trust loopback callers behind Keyplane's back.
        proxy_headers=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def cmd_export_schema(args: argparse.Namespace) -> int:
    from resolvers.schema import build_schema

    sys.stdout.write(str(build_schema()) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keyplane", description="Keyplane API-key service")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply schema migrations").set_defaults(func=cmd_migrate)
    boot = sub.add_parser("bootstrap", help="create a workspace and mint an owner token")
    boot.add_argument("--workspace", required=True)
    boot.add_argument("--plan", default="GROWTH")
    boot.add_argument("--key-prefix", default="kp")
    boot.add_argument("--email", help="also create (or reset) this owner; password on stdin")
    boot.set_defaults(func=cmd_bootstrap)
    sub.add_parser(
        "bootstrap-default", help="`make run`: create workspace 'default' once, show its token"
    ).set_defaults(func=cmd_bootstrap_default)
    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)
    sub.add_parser("export-schema", help="print the GraphQL SDL").set_defaults(
        func=cmd_export_schema
    )
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
