"""GraphiQL for internal tools, served entirely by Keyplane (no CDN: it works offline)."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS_DIR = Path(__file__).resolve().parent.parent / "static" / "graphiql"
ASSETS_PATH = "/graphiql-assets"

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Keyplane GraphiQL</title>
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <link rel="stylesheet" href="{assets}/graphiql.min.css">
  <style>html, body, #graphiql {{ height: 100%; margin: 0; }}</style>
</head>
<body>
  <div id="graphiql">Loading GraphiQL…</div>
  <script src="{assets}/react.production.min.js"></script>
  <script src="{assets}/react-dom.production.min.js"></script>
  <script src="{assets}/graphiql.min.js"></script>
  <script>
    // Paste a management or session token after "Bearer " in the Headers tab below.
    const fetcher = GraphiQL.createFetcher({{ url: window.location.pathname }});
    const defaultHeaders = JSON.stringify({{ Authorization: "Bearer " }}, null, 2);
    const defaultQuery = `# Keyplane management API. Put your token in Headers, then run:
query Keys {{
  workspace {{ name plan keyLimit activeKeyCount }}
  keys(first: 20) {{
    totalCount
    edges {{ node {{ id name type prefix status lastUsedAt environment {{ name }} }} }}
  }}
}}
`;
    ReactDOM.createRoot(document.getElementById("graphiql")).render(
      React.createElement(GraphiQL, {{
        fetcher,
        defaultHeaders,
        defaultQuery,
        headerEditorEnabled: true,
        shouldPersistHeaders: false,
        defaultEditorToolsVisibility: "headers",
      }})
    );
  </script>
</body>
</html>
"""


def graphiql_page() -> HTMLResponse:
    """The GraphiQL page, loading its scripts and styles from Keyplane itself."""
    return HTMLResponse(_PAGE.format(assets=ASSETS_PATH))


def graphiql_assets() -> StaticFiles:
    """The vendored GraphiQL, React and ReactDOM builds."""
    return StaticFiles(directory=ASSETS_DIR)
