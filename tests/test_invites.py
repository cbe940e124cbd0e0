"""Invitations: an invited member sets their own password with a one-time token (no bearer),
is logged in, and the token cannot be used again, after it lapses, or by anyone guessing."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from app.services.members import INVITE_LIFETIME
from models import AuditEvent, Member
from tests.support import OffsetClock, WorkspaceHandle, gql

PASSWORD = "a long enough passphrase"
INVITE = """mutation($e: String!, $r: MemberRole!) { inviteMember(email: $e, role: $r) {
  __typename ... on InviteMemberSuccess { inviteToken inviteExpiresAt member { id email role } }
  ... on Error { code message } } }"""
ACCEPT = """mutation($t: String!, $p: String!, $n: String) {
  acceptInvite(token: $t, password: $p, name: $n) {
    __typename ... on LoginSuccess { token expiresAt member { id email name role } }
    ... on Error { code message } } }"""
LOGIN = """mutation($e: String!, $p: String!) { login(email: $e, password: $p) {
  __typename ... on LoginSuccess { token } ... on Error { code message } } }"""


def email_for(ws: WorkspaceHandle, who: str) -> str:
    return f"{who}.{ws.name}@example.com"


async def invite(ws: WorkspaceHandle, email: str, role: str = "DEVELOPER") -> dict[str, Any]:
    result: dict[str, Any] = (await ws.q(INVITE, {"e": email, "r": role}))["inviteMember"]
    assert result["__typename"] == "InviteMemberSuccess", result
    return result


async def accept(
    client: httpx.AsyncClient, token: str, password: str = PASSWORD, name: str | None = None
) -> dict[str, Any]:
    body = await gql(client, ACCEPT, {"t": token, "p": password, "n": name})  # no bearer
    assert "errors" not in body, body
    result: dict[str, Any] = body["data"]["acceptInvite"]
    return result


async def test_an_invited_member_sets_a_password_and_is_logged_in(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = email_for(ws, "dev")
    invited = await invite(ws, email)
    token = invited["inviteToken"]
    assert token.startswith("kpi_")
    expires = datetime.fromisoformat(invited["inviteExpiresAt"])
    assert expires - clock.now() <= INVITE_LIFETIME
    # Before accepting, there is no password to log in with.
    body = await gql(ws.client, LOGIN, {"e": email, "p": PASSWORD})
    assert body["data"]["login"]["code"] == "INVALID_CREDENTIALS"

    result = await accept(ws.client, token, name="Dee Veloper")
    assert result["__typename"] == "LoginSuccess"
    assert result["member"] == {
        "id": invited["member"]["id"],
        "email": email,
        "name": "Dee Veloper",
        "role": "DEVELOPER",
    }
    session = result["token"]
    keys = await gql(ws.client, "{ keys { totalCount } }", token=session)
    assert "errors" not in keys
    # The password now works for login; the invitation is spent.
    body = await gql(ws.client, LOGIN, {"e": email, "p": PASSWORD})
    assert body["data"]["login"]["__typename"] == "LoginSuccess"
    again = await accept(ws.client, token, password="another passphrase!")
    assert again == {"__typename": "InvalidCredentialsError", **_generic()}

    member = await Member.get(email=email)
    assert member.invite_hash is None and member.password_hash is not None
    assert member.password_hash.startswith("$argon2")
    events = await AuditEvent.filter(action="member.accept_invite", actor=f"member:{email}")
    assert len(events) == 1 and token not in (events[0].detail or "")


def _generic() -> dict[str, str]:
    return {"code": "INVALID_CREDENTIALS", "message": "Invalid or expired invitation"}


async def test_a_lapsed_invitation_is_refused(ws: WorkspaceHandle, clock: OffsetClock) -> None:
    invited = await invite(ws, email_for(ws, "late"))
    clock.advance(seconds=INVITE_LIFETIME.total_seconds() + 60)
    result = await accept(ws.client, invited["inviteToken"])
    assert result == {"__typename": "InvalidCredentialsError", **_generic()}


async def test_reinviting_a_pending_member_voids_the_old_token(ws: WorkspaceHandle) -> None:
    email = email_for(ws, "twice")
    first = await invite(ws, email, "VIEWER")
    second = await invite(ws, email, "ADMIN")
    assert second["member"]["id"] == first["member"]["id"]
    assert second["inviteToken"] != first["inviteToken"]
    assert (await accept(ws.client, first["inviteToken"]))["code"] == "INVALID_CREDENTIALS"
    result = await accept(ws.client, second["inviteToken"])
    assert result["member"]["role"] == "ADMIN"
    # Once the member has a password, inviting them again is refused.
    body = await ws.q(INVITE, {"e": email, "r": "VIEWER"})
    assert body["inviteMember"]["code"] == "VALIDATION_FAILED"


async def test_a_removed_members_invitation_dies_with_them(ws: WorkspaceHandle) -> None:
    invited = await invite(ws, email_for(ws, "gone"))
    await ws.q(
        "mutation($id: ID!) { removeMember(id: $id) { __typename } }",
        {"id": invited["member"]["id"]},
    )
    assert (await accept(ws.client, invited["inviteToken"]))["code"] == "INVALID_CREDENTIALS"


@pytest.mark.parametrize(
    "token",
    [
        "kpi_0000000000000000000000000000",  # the right shape, a wrong checksum
        "not-a-token",
        "",
        "kpm_" + "A" * 28,
    ],
)
async def test_forged_tokens_get_the_generic_answer(ws: WorkspaceHandle, token: str) -> None:
    result = await accept(ws.client, token)
    assert result == {"__typename": "InvalidCredentialsError", **_generic()}


async def test_a_weak_password_is_refused_and_the_invitation_survives(
    ws: WorkspaceHandle,
) -> None:
    invited = await invite(ws, email_for(ws, "weak"))
    weak = await accept(ws.client, invited["inviteToken"], password="short")
    assert weak["code"] == "VALIDATION_FAILED" and "password" in weak["message"]
    assert "short" not in weak["message"]
    ok = await accept(ws.client, invited["inviteToken"])
    assert ok["__typename"] == "LoginSuccess"


async def test_guessing_invitation_tokens_is_rate_limited(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    limit = app.state.settings.auth_failure_limit
    transport = httpx.ASGITransport(app=app, client=("198.18.210.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as guesser:
        for _ in range(limit):
            body = await gql(guesser, ACCEPT, {"t": "kpi_" + "B" * 28, "p": PASSWORD})
            assert body["data"]["acceptInvite"]["code"] == "INVALID_CREDENTIALS"
        await gql(guesser, ACCEPT, {"t": "kpi_" + "C" * 28, "p": PASSWORD}, expect_status=429)


async def test_invitation_tokens_never_reach_logs_or_audit(
    ws: WorkspaceHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    invited = await invite(ws, email_for(ws, "quiet"))
    token = invited["inviteToken"]
    await accept(ws.client, token, password="short")  # an error message on the way
    await accept(ws.client, token)
    assert token not in caplog.text
    for event in await AuditEvent.filter(at__gte=datetime.now().astimezone() - timedelta(hours=1)):
        assert token not in (event.detail or "") and token not in event.actor
    # The members list never shows it either.
    listing = await ws.q("{ members { id email name role } }")
    assert token not in str(listing)
