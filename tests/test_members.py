"""Team members: login sessions, logout, roles, removal ending sessions at once."""

from __future__ import annotations

import httpx
import pytest
from passlib.hash import bcrypt
from starlette.applications import Starlette

from app.main import create_app
from app.passwords import hash_password
from app.services.members import set_owner
from app.settings import Settings
from models import AuditEvent, Member, Workspace
from tests.support import OffsetClock, WorkspaceHandle, gql

PASSWORD = "correct horse battery"
LOGIN = """mutation($e: String!, $p: String!) { login(email: $e, password: $p) {
  __typename ... on LoginSuccess { token expiresAt member { id email role } }
  ... on Error { code message } } }"""
INVITE = """mutation($e: String!, $r: MemberRole!) { inviteMember(email: $e, role: $r) {
  __typename ... on InviteMemberSuccess { member { id email role } }
  ... on Error { code message } } }"""


def _email(ws: WorkspaceHandle, who: str = "owner") -> str:
    """Emails are unique across Keyplane (login names no workspace), so each test has its own."""
    return f"{who}.{ws.name}@example.com"


async def _owner(ws: WorkspaceHandle, clock: OffsetClock, who: str = "owner") -> str:
    workspace = await Workspace.get(public_id=ws.id)
    await set_owner(workspace, _email(ws, who), PASSWORD, clock.now())
    return _email(ws, who)


async def _login(client: httpx.AsyncClient, email: str, password: str) -> dict[str, object]:
    body = await gql(client, LOGIN, {"e": email, "p": password})
    result: dict[str, object] = body["data"]["login"]
    return result


async def test_login_gives_a_session_that_acts_as_a_bearer(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    result = await _login(ws.client, email.upper(), PASSWORD)
    assert result["__typename"] == "LoginSuccess"
    token = str(result["token"])
    assert token.startswith("kps_")
    body = await gql(ws.client, "{ workspace { id } members { email role } }", token=token)
    assert body["data"]["workspace"]["id"] == ws.id
    assert body["data"]["members"] == [{"email": email, "role": "OWNER"}]


async def test_wrong_email_and_wrong_password_fail_alike(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    wrong_password = await _login(ws.client, email, "not the password")
    wrong_email = await _login(ws.client, "nobody@example.com", PASSWORD)
    assert wrong_password == wrong_email
    assert wrong_password["code"] == "INVALID_CREDENTIALS"
    assert PASSWORD not in str(wrong_email)


async def test_logout_ends_the_session(ws: WorkspaceHandle, clock: OffsetClock) -> None:
    email = await _owner(ws, clock)
    token = str((await _login(ws.client, email, PASSWORD))["token"])
    body = await gql(ws.client, "mutation { logout { __typename } }", token=token)
    assert body["data"]["logout"]["__typename"] == "LogoutSuccess"
    await gql(ws.client, "{ workspace { id } }", token=token, expect_status=401)


async def test_removing_a_member_ends_their_sessions_at_once(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    await _owner(ws, clock)
    leaver_email = await _owner(ws, clock, "leaver")
    token = str((await _login(ws.client, leaver_email, PASSWORD))["token"])
    await gql(ws.client, "{ workspace { id } }", token=token)
    leaver = await Member.get(email=leaver_email)
    data = await ws.q(
        "mutation($id: ID!) { removeMember(id: $id) { __typename } }", {"id": leaver.public_id}
    )
    assert data["removeMember"]["__typename"] == "RemoveMemberSuccess"
    await gql(ws.client, "{ workspace { id } }", token=token, expect_status=401)


async def test_viewer_can_read_but_not_create_keys(ws: WorkspaceHandle) -> None:
    data = await ws.q(INVITE, {"e": _email(ws, "viewer"), "r": "VIEWER"})
    member = data["inviteMember"]["member"]
    assert member["role"] == "VIEWER"
    # An invited member has no password yet; give one directly, as a setup step.
    await Member.filter(public_id=member["id"]).update(password_hash=hash_password(PASSWORD))
    token = str((await _login(ws.client, _email(ws, "viewer"), PASSWORD))["token"])
    ok = await gql(ws.client, "{ keys { totalCount } }", token=token)
    assert "errors" not in ok
    denied = await gql(
        ws.client,
        'mutation($e: ID!) { createKey(input: {environmentId: $e, name: "x"}) { __typename } }',
        {"e": ws.environments["production"]},
        token=token,
    )
    assert denied["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_an_email_belongs_to_one_member_only(
    ws: WorkspaceHandle, other_ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    data = await other_ws.q(INVITE, {"e": email, "r": "VIEWER"})
    assert data["inviteMember"]["code"] == "VALIDATION_FAILED"
    assert email in data["inviteMember"]["message"]


async def test_audit_names_the_member_who_acted(ws: WorkspaceHandle, clock: OffsetClock) -> None:
    email = await _owner(ws, clock)
    token = str((await _login(ws.client, email, PASSWORD))["token"])
    body = await gql(
        ws.client,
        'mutation($e: ID!) { createKey(input: {environmentId: $e, name: "by member"}) {'
        " ... on CreateKeySuccess { key { id } } } }",
        {"e": ws.environments["production"]},
        token=token,
    )
    key_id = body["data"]["createKey"]["key"]["id"]
    event = await AuditEvent.get(key_id=key_id, action="key.create")
    assert event.actor == f"member:{email}"


async def test_last_owner_cannot_be_removed_or_demoted(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    owner = await Member.get(email=email, workspace__public_id=ws.id)
    data = await ws.q(
        """mutation($id: ID!) {
             a: updateMember(id: $id, role: VIEWER) { ... on Error { code message } }
             b: removeMember(id: $id) { ... on Error { code message } } }""",
        {"id": owner.public_id},
    )
    assert data["a"]["code"] == "INVALID_STATE"
    assert data["b"]["code"] == "INVALID_STATE"


async def test_outdated_bcrypt_hash_is_upgraded_on_login(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    owner = await Member.get(email=email, workspace__public_id=ws.id)
    owner.password_hash = bcrypt.using(rounds=4).hash(PASSWORD)
    await owner.save(update_fields=["password_hash"])
    result = await _login(ws.client, email, PASSWORD)
    assert result["__typename"] == "LoginSuccess"
    await owner.refresh_from_db()
    assert owner.password_hash is not None and owner.password_hash.startswith("$argon2")


@pytest.mark.parametrize("email", ["not-an-email", "a@b", ""])
async def test_invite_refuses_a_bad_email_naming_it(ws: WorkspaceHandle, email: str) -> None:
    data = await ws.q(INVITE, {"e": email, "r": "DEVELOPER"})
    assert data["inviteMember"]["code"] == "VALIDATION_FAILED"
    assert repr(email) in data["inviteMember"]["message"]


async def test_failed_logins_are_rate_limited_per_ip(
    app: Starlette, settings: Settings, ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    email = await _owner(ws, clock)
    limited = create_app(Settings(database_url=settings.database_url, auth_failure_limit=3))
    transport = httpx.ASGITransport(app=limited, client=("198.51.100.77", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        for _ in range(3):
            result = await _login(client, email, "wrong password!")
            assert result["code"] == "INVALID_CREDENTIALS"
        body = await gql(client, LOGIN, {"e": email, "p": PASSWORD}, expect_status=429)
        assert body["errors"][0]["extensions"]["code"] == "RATE_LIMITED"


async def _admin_session(ws: WorkspaceHandle) -> tuple[str, str]:
    """An ADMIN member, logged in: (member ID, session token)."""
    data = await ws.q(INVITE, {"e": _email(ws, "admin"), "r": "ADMIN"})
    member_id = data["inviteMember"]["member"]["id"]
    await Member.filter(public_id=member_id).update(password_hash=hash_password(PASSWORD))
    token = str((await _login(ws.client, _email(ws, "admin"), PASSWORD))["token"])
    return member_id, token


async def test_an_admin_cannot_grant_change_or_remove_the_owner_role(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """member.manage lets an ADMIN manage members, but only an owner (member.owner) grants,
    changes or takes away OWNER: an ADMIN could make itself OWNER and demote the owners."""
    owner = await Member.get(email=await _owner(ws, clock))
    admin_id, token = await _admin_session(ws)
    attempts = {
        "self": ("updateMember(id: $id, role: OWNER)", admin_id),
        "demote": ("updateMember(id: $id, role: VIEWER)", owner.public_id),
        "remove": ("removeMember(id: $id)", owner.public_id),
    }
    for name, (call, member_id) in attempts.items():
        body = await gql(
            ws.client,
            f"mutation($id: ID!) {{ {call} {{ __typename }} }}",
            {"id": member_id},
            token=token,
        )
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN", (name, body)
    invite = await gql(ws.client, INVITE, {"e": _email(ws, "boss"), "r": "OWNER"}, token=token)
    assert invite["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    minted = await gql(
        ws.client,
        """mutation { createManagementToken(name: "t", permissions: ["member.owner"]) {
             __typename } }""",
        token=token,
    )
    assert minted["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert (await Member.get(public_id=admin_id)).role.value == "ADMIN"
    assert (await Member.get(id=owner.id)).role.value == "OWNER"
    # The ADMIN still manages the other roles; an owner may grant OWNER.
    viewer = await gql(ws.client, INVITE, {"e": _email(ws, "v"), "r": "VIEWER"}, token=token)
    assert viewer["data"]["inviteMember"]["__typename"] == "InviteMemberSuccess"
    promoted = await ws.q(
        "mutation($id: ID!) { updateMember(id: $id, role: OWNER) { __typename } }",
        {"id": admin_id},
    )
    assert promoted["updateMember"]["__typename"] == "UpdateMemberSuccess"


async def test_an_invitation_not_accepted_does_not_count_as_an_owner(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """Counting a pending OWNER invitation let the one real owner step down, and the invitation
    then be turned into a VIEWER: a workspace with no owner."""
    owner = await Member.get(email=await _owner(ws, clock))
    pending = (await ws.q(INVITE, {"e": _email(ws, "later"), "r": "OWNER"}))["inviteMember"]
    data = await ws.q(
        "mutation($id: ID!) { updateMember(id: $id, role: ADMIN) { ... on Error { code } } }",
        {"id": owner.public_id},
    )
    assert data["updateMember"] == {"code": "INVALID_STATE"}
    # The invitation itself may change or go: it owns nothing yet.
    again = await ws.q(INVITE, {"e": _email(ws, "later"), "r": "VIEWER"})
    assert again["inviteMember"]["member"]["role"] == "VIEWER"
    gone = await ws.q(
        "mutation($id: ID!) { removeMember(id: $id) { __typename } }",
        {"id": pending["member"]["id"]},
    )
    assert gone["removeMember"]["__typename"] == "RemoveMemberSuccess"
    assert (await Member.get(id=owner.id)).role.value == "OWNER"


async def test_a_members_tokens_hold_no_more_than_the_member_does_now(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """A token an ADMIN minted kept every right after the ADMIN was demoted or removed."""
    admin_id, session = await _admin_session(ws)
    minted = await gql(
        ws.client,
        """mutation { createManagementToken(name: "mine",
             permissions: ["api.key.view", "member.manage"]) {
             ... on CreateManagementTokenSuccess { token } } }""",
        token=session,
    )
    token = minted["data"]["createManagementToken"]["token"]
    members = "{ members { email role } }"
    assert "errors" not in await gql(ws.client, members, token=token)
    demoted = await ws.q(
        "mutation($id: ID!) { updateMember(id: $id, role: VIEWER) { __typename } }",
        {"id": admin_id},
    )
    assert demoted["updateMember"]["__typename"] == "UpdateMemberSuccess"
    invite = await gql(ws.client, INVITE, {"e": _email(ws, "x"), "r": "VIEWER"}, token=token)
    assert invite["errors"][0]["extensions"]["code"] == "FORBIDDEN"  # member.manage is gone
    assert "errors" not in await gql(ws.client, members, token=token)  # api.key.view stays
    removed = await ws.q(
        "mutation($id: ID!) { removeMember(id: $id) { __typename } }", {"id": admin_id}
    )
    assert removed["removeMember"]["__typename"] == "RemoveMemberSuccess"
    await gql(ws.client, members, token=token, expect_status=401)
