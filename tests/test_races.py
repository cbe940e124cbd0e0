"""Management writes that race: two requests at the same moment must leave what one at a time
would leave, and the loser gets a typed error, never an internal one. On PostgreSQL the
requests' transactions really overlap (one pool connection each); SQLite runs one at a time."""

from __future__ import annotations

import asyncio

from app.passwords import hash_password
from app.services.members import set_owner
from models import Environment, Member, MemberRole, Role, Workspace
from tests.support import OffsetClock, WorkspaceHandle, gql

PASSWORD = "correct horse battery"
ROUNDS = 5


def _codes(results: list[dict[str, object]]) -> list[str]:
    return sorted(str(r.get("code", r.get("__typename"))) for r in results)


async def _session(ws: WorkspaceHandle, email: str) -> str:
    body = await gql(
        ws.client,
        "mutation($e: String!, $p: String!) { login(email: $e, password: $p) {"
        " ... on LoginSuccess { token } } }",
        {"e": email, "p": PASSWORD},
    )
    return str(body["data"]["login"]["token"])


async def test_two_owners_demoting_each_other_leave_one_owner(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    """Each counted two owners and went through: the workspace was left with none."""
    workspace = await Workspace.get(public_id=ws.id)
    emails = [f"{who}.{ws.name}@example.com" for who in ("a", "b")]
    members = [await set_owner(workspace, email, PASSWORD, clock.now()) for email in emails]
    sessions = [await _session(ws, email) for email in emails]
    demote = (
        "mutation($id: ID!) { updateMember(id: $id, role: ADMIN) {"
        " __typename ... on Error { code } } }"
    )
    for _ in range(ROUNDS):
        await Member.filter(id__in=[m.id for m in members]).update(role=MemberRole.OWNER)
        # a demotes b while b demotes a.
        bodies = await asyncio.gather(
            gql(ws.client, demote, {"id": members[1].public_id}, token=sessions[0]),
            gql(ws.client, demote, {"id": members[0].public_id}, token=sessions[1]),
        )
        results = [body["data"]["updateMember"] for body in bodies]
        assert _codes(results) == ["INVALID_STATE", "UpdateMemberSuccess"], bodies
        owners = await Member.filter(workspace_id=workspace.id, role=MemberRole.OWNER).count()
        assert owners == 1


async def test_two_owners_removing_each_other_leave_one_owner(
    ws: WorkspaceHandle, clock: OffsetClock
) -> None:
    workspace = await Workspace.get(public_id=ws.id)
    remove = "mutation($id: ID!) { removeMember(id: $id) { __typename ... on Error { code } } }"
    for round_ in range(ROUNDS):
        emails = [f"{who}{round_}.{ws.name}@example.com" for who in ("a", "b")]
        members = [await set_owner(workspace, email, PASSWORD, clock.now()) for email in emails]
        sessions = [await _session(ws, email) for email in emails]
        bodies = await asyncio.gather(
            gql(ws.client, remove, {"id": members[1].public_id}, token=sessions[0]),
            gql(ws.client, remove, {"id": members[0].public_id}, token=sessions[1]),
        )
        # The loser's own session ended with its removal (UNAUTHENTICATED) or it found the
        # other the last owner (INVALID_STATE); never both removed.
        assert await Member.filter(id__in=[m.id for m in members]).count() == 1, bodies
        survivor = await Member.get(id__in=[m.id for m in members])
        await Member.filter(id=survivor.id).delete()


async def test_one_email_invited_into_two_workspaces_at_once_joins_one(
    ws: WorkspaceHandle, other_ws: WorkspaceHandle
) -> None:
    """Both invitations passed the check, and login(email) then found two members
    (an internal error for that email, for good)."""
    invite = """mutation($e: String!) { inviteMember(email: $e, role: VIEWER) {
      __typename ... on Error { code message } } }"""
    for round_ in range(ROUNDS):
        email = f"twice{round_}.{ws.name}@example.com"
        results = await asyncio.gather(ws.q(invite, {"e": email}), other_ws.q(invite, {"e": email}))
        outcomes = [data["inviteMember"] for data in results]
        assert _codes(outcomes) == ["InviteMemberSuccess", "VALIDATION_FAILED"], outcomes
        failed = next(o for o in outcomes if o["__typename"] != "InviteMemberSuccess")
        assert email in str(failed["message"])
        assert await Member.filter(email=email).count() == 1
        # The one who joined can log in once the invitation is accepted.
        await Member.filter(email=email).update(password_hash=hash_password(PASSWORD))
        assert await _session(ws, email)


async def test_one_name_created_twice_at_once_is_created_once(ws: WorkspaceHandle) -> None:
    """The second insert failed on the unique index: an internal error, not the typed one."""
    role = """mutation($n: String!) { createRole(name: $n, permissions: ["a.read"]) {
      __typename ... on Error { code message } } }"""
    env = """mutation($n: String!) { createEnvironment(name: $n) {
      __typename ... on Error { code message } } }"""
    workspace = await Workspace.get(public_id=ws.id)
    for round_ in range(ROUNDS):
        for query, model in ((role, Role), (env, Environment)):
            name = f"twin {round_}"
            results = await asyncio.gather(*(ws.raw(query, {"n": name}) for _ in range(3)))
            outcomes = [next(iter(body["data"].values())) for body in results]
            assert [body.get("errors") for body in results] == [None] * 3, results
            codes = _codes(outcomes)
            assert [code.endswith("Success") for code in codes].count(True) == 1, outcomes
            assert codes.count("VALIDATION_FAILED") == 2, outcomes
            assert await model.filter(workspace_id=workspace.id, name=name).count() == 1
