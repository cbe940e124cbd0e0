"""schema.graphql is exactly what `keyplane export-schema` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_schema_file_matches_the_exported_schema() -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "app.cli", "export-schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "schema.graphql").read_text()
    assert exported == committed, "schema.graphql is stale: run `make schema`"
