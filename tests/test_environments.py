"""createEnvironment takes any name, as the contract says (`production`, `staging`,
`development`, or any name): a key in it verifies. Names that cannot be shown or stored are
refused naming the value."""

from __future__ import annotations

import pytest

from tests.support import WorkspaceHandle

CREATE = """mutation($name: String!) { createEnvironment(name: $name) {
    __typename ... on CreateEnvironmentSuccess { environment { id name clientSideId } }
    ... on ValidationFailedError { message field } } }"""


@pytest.mark.parametrize("name", ["QA Europe", "Préprod", "staging-2", "Team A / canary"])
async def test_any_name_makes_an_environment_whose_keys_verify(
    ws: WorkspaceHandle, name: str
) -> None:
    result = (await ws.q(CREATE, {"name": f"  {name} "}))["createEnvironment"]
    assert result["__typename"] == "CreateEnvironmentSuccess", result
    environment = result["environment"]
    assert environment["name"] == name  # stripped
    ws.environments[name] = environment["id"]
    _, secret = await ws.create_key(name)
    response = await ws.client.get("/v1/verify", headers={"X-API-Key": secret})
    assert response.json()["code"] == "VALID"
    assert response.json()["environmentId"] == environment["id"]
    again = (await ws.q(CREATE, {"name": name}))["createEnvironment"]
    assert again["__typename"] == "ValidationFailedError" and name in again["message"]


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("x" * 65, "65 characters"),
        ("a\nb", "'a\\nb'"),
        ("kp_sdk_" + "A" * 30, "API key"),
    ],
)
async def test_names_that_cannot_be_shown_are_refused_naming_them(
    ws: WorkspaceHandle, name: str, said: str
) -> None:
    result = (await ws.q(CREATE, {"name": name}))["createEnvironment"]
    assert result["__typename"] == "ValidationFailedError", result
    assert said in result["message"] and result["field"] == "name"
