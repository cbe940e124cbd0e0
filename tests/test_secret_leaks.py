"""Nothing secret ever reaches a log line, an error message, an audit entry or a later response:
no token, no stored hash, no password."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette

from app.services.members import set_owner
from app.tokens import hash_secret
from models import AuditEvent, Denial, Workspace
from tests.support import OffsetClock, WorkspaceHandle, gql

PASSWORD = "leak-test password 123"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


async def test_no_secret_in_logs_audit_or_later_responses(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock, captured_logs: _Capture
) -> None:
    later: list[str] = []  # every response body after the one that showed a secret
    secrets: list[str] = [ws.token]

    async def run(query: str, variables: dict | None = None, token: str | None = None) -> dict:
        body = await gql(ws.client, query, variables, token=token or ws.token)
        later.append(str(body))
        return body

    created = await run(
        """mutation($e: ID!) { createKey(input: {environmentId: $e, name: "leak",
             permissions: ["a.b"], allowedIps: ["10.0.0.0/8"]}) {
             ... on CreateKeySuccess { secret key { id } } } }""",
        {"e": ws.environments["production"]},
    )
    key_id = created["data"]["createKey"]["key"]["id"]
    secrets.append(created["data"]["createKey"]["secret"])
    rotated = await run(
        f'mutation {{ rotateKey(id: "{key_id}", graceMinutes: 15) {{'
        " ... on RotateKeySuccess { secret newKey { id } } } }"
    )
    new_id = rotated["data"]["rotateKey"]["newKey"]["id"]
    secrets.append(rotated["data"]["rotateKey"]["secret"])
    minted = await run(
        'mutation { createManagementToken(name: "ci", permissions: ["api.key.view"]) {'
        " ... on CreateManagementTokenSuccess { token } } }"
    )
    secrets.append(minted["data"]["createManagementToken"]["token"])
    workspace = await Workspace.get(public_id=ws.id)
    email = f"leak.{ws.name}@example.com"
    await set_owner(workspace, email, PASSWORD, clock.now())
    login = await run(
        "mutation($e: String!, $p: String!) { login(email: $e, password: $p) {"
        " ... on LoginSuccess { token } } }",
        {"e": email, "p": PASSWORD},
    )
    secrets.append(login["data"]["login"]["token"])
    invited = await run(
        """mutation($e: String!) { inviteMember(email: $e, role: VIEWER) {
             ... on InviteMemberSuccess { inviteToken } } }""",
        {"e": f"invitee.{ws.name}@example.com"},
    )
    secrets.append(invited["data"]["inviteMember"]["inviteToken"])
    accepted = await gql(
        ws.client,
        """mutation($t: String!, $p: String!) { acceptInvite(token: $t, password: $p) {
             ... on LoginSuccess { token } } }""",
        {"t": secrets[-1], "p": PASSWORD},
    )
    later.append(str(accepted))
    secrets.append(accepted["data"]["acceptInvite"]["token"])
    # Verifications, valid and refused, every way a key can arrive; the answers must not
    # echo the key.
    tampered = secrets[1][:-1] + ("A" if secrets[1][-1] != "A" else "B")
    for token in (secrets[1], secrets[2], tampered):
        for response in (
            await ws.client.get("/v1/verify", headers={"X-API-Key": token}),
            await ws.client.post(
                "/v1/verify", headers={"Authorization": f"Bearer {token}"}, json={}
            ),
            await ws.client.post("/v1/verify", json={"key": token, "permissions": ["a.b"]}),
        ):
            later.append(response.text)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 1))  # on the allowlist
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as inside:
        ok = await inside.get("/v1/verify", headers={"X-API-Key": secrets[2]})
        assert ok.json()["code"] == "VALID"
        later.append(ok.text)
    assert await app.state.usage.flush()
    later.append((await ws.client.get("/metrics")).text)
    later.append(
        str(
            await run(
                """{ denials(first: 100) { edges { node { keyId ip origin code message } } }
                     denialsByIp { ip codes } }"""
            )
        )
    )
    # Refusals and errors that might echo what they were given.
    await run(
        "mutation($p: String!) { login(email: $p, password: $p) { ... on Error { message } } }",
        {"p": PASSWORD},
    )
    await gql(ws.client, "{ workspace { id } }", token=secrets[1], expect_status=401)
    await run(f'{{ key(id: "{secrets[1]}") {{ id }} }}')
    await run(
        f'mutation {{ updateKey(id: "{new_id}", input: {{name: "{secrets[2][:20]}"}}) {{'
        " __typename } }"
    )
    await run(f'mutation {{ revoke(id: "{secrets[1]}") {{ ... on Error {{ message }} }} }}')
    # Everything readable afterwards.
    await run(
        """{ keys(first: 100) { edges { node { id name prefix permissions allowedIps
             environment { clientSideId } } } }
           auditLog(first: 100) { edges { node { action actor keyId detail } } } }"""
    )

    audit_text = " ".join(
        f"{e.action} {e.actor} {e.detail}"
        for e in await AuditEvent.filter(workspace__public_id=ws.id)
    )
    audit_text += " ".join(
        f"{d.key_id} {d.ip} {d.origin} {d.code} {d.message}" for d in await Denial.all()
    )
    hashes = [hash_secret(s) for s in secrets]
    for where, text in {"logs": "\n".join(captured_logs.lines), "audit": audit_text}.items():
        for secret in [*secrets, *hashes, PASSWORD]:
            assert secret not in text, f"a secret leaked into {where}"
    # Each secret appears in the one response that minted it, never after; hashes never.
    every_response = "\n".join(later)
    for secret, digest in zip(secrets[1:], hashes[1:], strict=True):
        shown_at = [i for i, body in enumerate(later) if secret in body]
        assert len(shown_at) == 1, "a secret was shown more than once"
        assert digest not in every_response
    assert PASSWORD not in every_response
