"""The app starts on the configured database and answers an authenticated query."""

from tests.support import WorkspaceHandle


async def test_owner_sees_its_workspace(ws: WorkspaceHandle) -> None:
    data = await ws.q("{ workspace { id name plan keyLimit } environments { name } }")
    assert data["workspace"]["id"] == ws.id
    assert data["workspace"]["keyLimit"] is None
    assert sorted(e["name"] for e in data["environments"]) == [
        "development",
        "production",
        "staging",
    ]
