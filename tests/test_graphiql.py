"""GraphiQL is served entirely by Keyplane (no CDN) and works in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.live import live_server
from tests.support import WorkspaceHandle

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_graphiql_page_loads_only_local_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text[:500]
    for source in sources:
        assert not urlsplit(source).netloc, f"{source} is not served by Keyplane"
        asset = await client.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 1000
    assert '"Bearer "' in page.text  # the header editor starts with the Authorization header


async def test_graphiql_can_be_switched_off(settings: object) -> None:
    from app.main import create_app
    from app.settings import Settings

    assert isinstance(settings, Settings)
    app = create_app(Settings(database_url=settings.database_url, graphiql=False))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as client:
        page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 404


def _chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            check=True,
            capture_output=True,
            timeout=600,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return shutil.which("chromium")


@pytest.mark.slow
def test_graphiql_runs_a_keys_query_in_a_real_browser(
    ws: WorkspaceHandle, database_url: str
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium could not be installed on this machine")
    ARTIFACTS.mkdir(exist_ok=True)
    with live_server(database_url) as base_url, playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            outside: list[str] = []
            page.on(
                "request",
                lambda request: (
                    None
                    if urlsplit(request.url).hostname in {"127.0.0.1", "localhost"}
                    or request.url.startswith("data:")
                    else outside.append(request.url)
                ),
            )
            page.goto(f"{base_url}/graphql", wait_until="networkidle")
            page.wait_for_selector(".graphiql-query-editor .CodeMirror", timeout=15_000)
            page.evaluate(
                """([query, headers]) => {
                    const editors = document.querySelectorAll(".CodeMirror");
                    document.querySelector(".graphiql-query-editor .CodeMirror")
                        .CodeMirror.setValue(query);
                    const tool = [...editors].find(
                        e => e.CodeMirror.getValue().includes("Authorization"));
                    tool.CodeMirror.setValue(headers);
                }""",
                [
                    "query Keys { keys(first: 5) { totalCount edges { node { id name } } } }",
                    f'{{"Authorization": "Bearer {ws.token}"}}',
                ],
            )
            page.click(".graphiql-execute-button")
            page.wait_for_function(
                """() => [...document.querySelectorAll(".result-window .CodeMirror")]
                     .some(e => e.CodeMirror.getValue().includes("totalCount"))""",
                timeout=15_000,
            )
            result = page.evaluate(
                """() => document.querySelector(".result-window .CodeMirror")
                     .CodeMirror.getValue()"""
            )
            page.screenshot(path=str(ARTIFACTS / "graphiql.png"), full_page=True)
        finally:
            browser.close()
    assert '"totalCount": 3' in result  # the workspace's three client-side IDs
    assert outside == [], f"requests left loopback: {outside}"
