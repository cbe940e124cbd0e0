"""Every mutation in the schema writes its audit entry (app/services/audit.py: "one entry per
mutation"), with the acting principal as actor and never a secret in it.

SCENARIOS maps each mutation name to a scenario that performs it successfully over HTTP; a new
mutation without a scenario fails the first test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import graphql
import pytest

from app.services.members import set_owner
from app.tokens import hash_secret
from models import AuditEvent, ManagementToken, Workspace
from resolvers.schema import build_schema
from tests.support import OffsetClock, WorkspaceHandle, gql

PASSWORD = "correct horse battery staple"
RESULT = "__typename ... on Error { code message }"
AUDIT_LOG = """query($k: ID, $n: Int!) { auditLog(keyId: $k, first: $n) { totalCount
  edges { node { id at action actor keyId detail } } } }"""


@dataclass
class Run:
    """What a scenario needs and what it reports back."""

    ws: WorkspaceHandle
    clock: OffsetClock
    secrets: list[str] = field(default_factory=list)
    mark: int = 0  # audit events with a greater id were written by the mutation under test

    async def checkpoint(self) -> None:
        """Call right before the mutation under test, after any setup."""
        workspace = await Workspace.get(public_id=self.ws.id)
        last = await AuditEvent.filter(workspace_id=workspace.id).order_by("-id").first()
        self.mark = last.id if last else 0

    async def ok(
        self,
        query: str,
        variables: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        anonymous: bool = False,
    ) -> dict[str, Any]:
        """Run a single-field mutation and require its …Success member."""
        bearer = None if anonymous else token or self.ws.token
        body = await gql(self.ws.client, query, variables, token=bearer)
        assert "errors" not in body, body
        (result,) = body["data"].values()
        assert result["__typename"].endswith("Success"), result
        return dict(result)

    async def key(self, env: str = "production") -> str:
        key_id, secret = await self.ws.create_key(env)
        self.secrets.append(secret)
        return key_id

    async def invite(self, email_tag: str, role: str = "DEVELOPER") -> tuple[str, str, str]:
        """Invite a member: (member ID, email, one-time invitation token)."""
        email = f"{email_tag}.{self.ws.name}@example.com"
        result = await self.ok(
            f"""mutation($e: String!, $r: MemberRole!) {{ inviteMember(email: $e, role: $r) {{
              {RESULT} ... on InviteMemberSuccess {{ inviteToken member {{ id }} }} }} }}""",
            {"e": email, "r": role},
        )
        self.secrets.append(result["inviteToken"])
        return str(result["member"]["id"]), email, str(result["inviteToken"])

    async def member(self, email_tag: str, role: str = "DEVELOPER") -> str:
        return (await self.invite(email_tag, role))[0]

    async def session(self) -> tuple[str, str]:
        """A logged-in owner: (email, session token)."""
        workspace = await Workspace.get(public_id=self.ws.id)
        email = f"owner.{self.ws.name}@example.com"
        await set_owner(workspace, email, PASSWORD, self.clock.now())
        result = await self.ok(
            f"""mutation($e: String!, $p: String!) {{ login(email: $e, password: $p) {{
              {RESULT} ... on LoginSuccess {{ token }} }} }}""",
            {"e": email, "p": PASSWORD},
            anonymous=True,
        )
        token = str(result["token"])
        self.secrets.append(token)
        return email, token


@dataclass(frozen=True)
class Expect:
    """The audit entries the mutation must add, in order written (oldest first)."""

    actions: list[str]
    key_ids: list[str | None]
    actor: str | None = None  # None: the owner's management token


Scenario = Callable[[Run], Awaitable[Expect]]


async def create_key(run: Run) -> Expect:
    await run.checkpoint()
    key_id = await run.key()
    return Expect(["key.create"], [key_id])


async def update_key(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    await run.ok(
        f"""mutation($id: ID!) {{ updateKey(id: $id, input: {{name: "renamed",
          permissions: ["pdf.read"], description: "d"}}) {{ {RESULT} }} }}""",
        {"id": key_id},
    )
    return Expect(["key.update"], [key_id])


async def set_status(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    for status in ("DISABLED", "ENABLED"):
        await run.ok(
            f"""mutation($id: ID!, $s: KeyStatus!) {{ setStatus(id: $id, status: $s) {{
              {RESULT} }} }}""",
            {"id": key_id, "s": status},
        )
    return Expect(["key.disable", "key.enable"], [key_id, key_id])


async def revoke(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    await run.ok(
        f"mutation($id: ID!) {{ revoke(id: $id, graceMinutes: 15) {{ {RESULT} }} }}",
        {"id": key_id},
    )
    return Expect(["key.revoke"], [key_id])


async def rotate_key(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    result = await run.ok(
        f"""mutation($id: ID!) {{ rotateKey(id: $id, graceMinutes: 0) {{ {RESULT}
          ... on RotateKeySuccess {{ secret newKey {{ id }} }} }} }}""",
        {"id": key_id},
    )
    run.secrets.append(result["secret"])
    # One entry on the old key, one on its replacement (whose history starts there).
    return Expect(["key.rotate", "key.rotate"], [key_id, result["newKey"]["id"]])


async def rotate_all(run: Run) -> Expect:
    first, second = await run.key("staging"), await run.key("staging")
    await run.checkpoint()
    result = await run.ok(
        f"""mutation($e: ID!) {{ rotateAll(environmentId: $e, graceMinutes: 60) {{ {RESULT}
          ... on RotateAllSuccess {{ rotated {{ secret oldKey {{ id }} newKey {{ id }} }} }}
          }} }}""",
        {"e": run.ws.environments["staging"]},
    )
    run.secrets.extend(r["secret"] for r in result["rotated"])
    assert {r["oldKey"]["id"] for r in result["rotated"]} == {first, second}
    keys = [k for r in result["rotated"] for k in (r["oldKey"]["id"], r["newKey"]["id"])]
    return Expect(["key.rotate"] * 4, keys)


async def test_a_rotate_all_that_finds_no_key_is_audited_too(ws: WorkspaceHandle) -> None:
    data = await ws.q(
        """mutation($e: ID!) { rotateAll(environmentId: $e) {
             ... on RotateAllSuccess { rotated { secret } } } }""",
        {"e": ws.environments["development"]},
    )
    assert data["rotateAll"]["rotated"] == []
    events = await _events(ws)
    assert events[-1].action == "key.rotate_all" and events[-1].key_id is None
    assert ws.environments["development"] in (events[-1].detail or "")


async def set_allowed_ips(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    await run.ok(
        f"""mutation($id: ID!) {{ setAllowedIps(id: $id, ips: ["192.0.2.7", "2001:db8::/32"]) {{
          {RESULT} }} }}""",
        {"id": key_id},
    )
    return Expect(["key.set_allowed_ips"], [key_id])


async def delete_key(run: Run) -> Expect:
    key_id = await run.key()
    await run.checkpoint()
    await run.ok(f"mutation($id: ID!) {{ deleteKey(id: $id) {{ {RESULT} }} }}", {"id": key_id})
    return Expect(["key.delete"], [key_id])


async def create_environment(run: Run) -> Expect:
    await run.checkpoint()
    await run.ok(f'mutation {{ createEnvironment(name: "qa") {{ {RESULT} }} }}')
    return Expect(["environment.create"], [None])


async def set_authorized_origins(run: Run) -> Expect:
    await run.checkpoint()
    await run.ok(
        f"""mutation($e: ID!) {{ setAuthorizedOrigins(environmentId: $e,
          origins: ["https://app.example.com"]) {{ {RESULT} }} }}""",
        {"e": run.ws.environments["production"]},
    )
    return Expect(["environment.set_authorized_origins"], [None])


async def set_rotation_policy(run: Run) -> Expect:
    await run.checkpoint()
    await run.ok(
        f"""mutation($e: ID!) {{ setRotationPolicy(environmentId: $e, days: 30) {{
          {RESULT} }} }}""",
        {"e": run.ws.environments["production"]},
    )
    return Expect(["environment.set_rotation_policy"], [None])


async def create_role(run: Run) -> Expect:
    await run.checkpoint()
    await run.ok(
        f'mutation {{ createRole(name: "pdf-reader", permissions: ["pdf.*"]) {{ {RESULT} }} }}'
    )
    return Expect(["role.create"], [None])


async def create_management_token(run: Run) -> Expect:
    await run.checkpoint()
    result = await run.ok(
        f"""mutation {{ createManagementToken(name: "ci", permissions: ["api.key.view"]) {{
          {RESULT} ... on CreateManagementTokenSuccess {{ token }} }} }}"""
    )
    run.secrets.append(result["token"])
    return Expect(["management_token.create"], [None])


async def invite_member(run: Run) -> Expect:
    await run.checkpoint()
    await run.member("invited")
    return Expect(["member.invite"], [None])


async def accept_invite(run: Run) -> Expect:
    """Needs no bearer: the entry's actor is the member who accepted."""
    _, email, invitation = await run.invite("invitee")
    await run.checkpoint()
    result = await run.ok(
        f"""mutation($t: String!, $p: String!) {{ acceptInvite(token: $t, password: $p) {{
          {RESULT} ... on LoginSuccess {{ token }} }} }}""",
        {"t": invitation, "p": PASSWORD},
        anonymous=True,
    )
    run.secrets.append(result["token"])
    return Expect(["member.accept_invite"], [None], actor=f"member:{email}")


async def update_member(run: Run) -> Expect:
    member_id = await run.member("promoted")
    await run.checkpoint()
    await run.ok(
        f"""mutation($id: ID!) {{ updateMember(id: $id, role: ADMIN) {{ {RESULT} }} }}""",
        {"id": member_id},
    )
    return Expect(["member.update"], [None])


async def remove_member(run: Run) -> Expect:
    """Run as a logged-in member, so the member actor form is covered too."""
    member_id = await run.member("leaver")
    email, session = await run.session()
    await run.checkpoint()
    await run.ok(
        f"mutation($id: ID!) {{ removeMember(id: $id) {{ {RESULT} }} }}",
        {"id": member_id},
        token=session,
    )
    return Expect(["member.remove"], [None], actor=f"member:{email}")


async def set_business_hours(run: Run) -> Expect:
    await run.checkpoint()
    await run.ok(
        f"""mutation {{ setBusinessHours(hours: {{timeZone: "Europe/Paris", days: [1, 2, 3],
          startHour: 9, endHour: 18}}) {{ {RESULT} }} }}"""
    )
    return Expect(["workspace.set_business_hours"], [None])


async def login(run: Run) -> Expect:
    workspace = await Workspace.get(public_id=run.ws.id)
    email = f"owner.{run.ws.name}@example.com"
    await set_owner(workspace, email, PASSWORD, run.clock.now())
    await run.checkpoint()
    result = await run.ok(
        f"""mutation($e: String!, $p: String!) {{ login(email: $e, password: $p) {{
          {RESULT} ... on LoginSuccess {{ token }} }} }}""",
        {"e": email, "p": PASSWORD},
        anonymous=True,
    )
    run.secrets.append(result["token"])
    return Expect(["member.login"], [None], actor=f"member:{email}")


async def logout(run: Run) -> Expect:
    email, session = await run.session()
    await run.checkpoint()
    await run.ok(f"mutation {{ logout {{ {RESULT} }} }}", token=session)
    return Expect(["member.logout"], [None], actor=f"member:{email}")


SCENARIOS: dict[str, Scenario] = {
    "createKey": create_key,
    "updateKey": update_key,
    "setStatus": set_status,
    "revoke": revoke,
    "rotateKey": rotate_key,
    "rotateAll": rotate_all,
    "setAllowedIps": set_allowed_ips,
    "deleteKey": delete_key,
    "createEnvironment": create_environment,
    "setAuthorizedOrigins": set_authorized_origins,
    "setRotationPolicy": set_rotation_policy,
    "createRole": create_role,
    "createManagementToken": create_management_token,
    "inviteMember": invite_member,
    "acceptInvite": accept_invite,
    "updateMember": update_member,
    "removeMember": remove_member,
    "setBusinessHours": set_business_hours,
    "login": login,
    "logout": logout,
}


def schema_mutations() -> set[str]:
    """Mutation field names of the schema the app serves (resolvers/schema.py)."""
    parsed = graphql.build_schema(build_schema().as_str())
    assert parsed.mutation_type is not None
    return set(parsed.mutation_type.fields)


def test_every_mutation_has_an_audit_scenario() -> None:
    mutations = schema_mutations()
    assert set(SCENARIOS) == mutations, (
        f"without a scenario: {sorted(mutations - set(SCENARIOS))}; "
        f"not in the schema: {sorted(set(SCENARIOS) - mutations)}"
    )


async def _events(ws: WorkspaceHandle) -> list[AuditEvent]:
    workspace = await Workspace.get(public_id=ws.id)
    return await AuditEvent.filter(workspace_id=workspace.id).order_by("id")


async def _owner_actor(ws: WorkspaceHandle) -> str:
    record = await ManagementToken.get(token_hash=hash_secret(ws.token))
    return f"token:{record.name} ({record.public_id})"


def _no_secret_in(events: list[AuditEvent], secrets: list[str]) -> None:
    for event in events:
        for secret in secrets:
            assert secret not in event.actor, (event.action, event.actor)
            assert secret not in (event.detail or ""), (event.action, event.detail)
            # Nor the part after the display prefix, which would let a leak be rebuilt.
            assert secret[-28:] not in (event.detail or ""), (event.action, event.detail)


@pytest.mark.parametrize("mutation", sorted(SCENARIOS))
async def test_mutation_writes_its_audit_entry(
    ws: WorkspaceHandle, clock: OffsetClock, mutation: str
) -> None:
    run = Run(ws=ws, clock=clock, secrets=[ws.token])
    expect = await SCENARIOS[mutation](run)
    actor = expect.actor or await _owner_actor(ws)

    events = await _events(ws)
    new = [e for e in events if e.id > run.mark]
    assert [e.action for e in new] == expect.actions, [(e.action, e.key_id) for e in new]
    assert [e.key_id for e in new] == expect.key_ids
    for event in new:
        assert event.actor and event.actor == actor
        assert event.at is not None

    # The same entries through the API, newest first.
    data = await ws.q(AUDIT_LOG, {"k": None, "n": 50})
    nodes = [edge["node"] for edge in data["auditLog"]["edges"]]
    assert data["auditLog"]["totalCount"] == len(events)
    shown = [n for n in nodes if int(n["id"].removeprefix("evt_")) > run.mark]
    assert [n["action"] for n in reversed(shown)] == expect.actions
    assert all(n["actor"] == actor for n in shown)
    for key_id in {k for k in expect.key_ids if k is not None}:
        by_key = await ws.q(AUDIT_LOG, {"k": key_id, "n": 50})
        actions = [e["node"]["action"] for e in by_key["auditLog"]["edges"]]
        assert set(expect.actions) <= set(actions)
        assert all(e["node"]["keyId"] == key_id for e in by_key["auditLog"]["edges"])

    _no_secret_in(events, run.secrets)
