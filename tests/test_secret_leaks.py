"""Nothing secret ever reaches a log line, an error message, an audit entry or a later response:
no token, no stored hash, no password."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from app.services.members import set_owner
from app.tokens import hash_secret
from models import AuditEvent, Workspace
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
    ws: WorkspaceHandle, clock: OffsetClock, captured_logs: _Capture
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
