"""The documentation cannot drift from the code: the CLI reference is the commands' own help."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_cli_reference_is_what_the_commands_say_today():
    generator = runpy.run_path(str(ROOT / "docs" / "cli_reference.py"))
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == generator["reference"](), (
        "docs/cli.md is out of date: run `.venv/bin/python docs/cli_reference.py`"
    )
    for command in ("certify", "predict", "evaluate", "train", "labels", "serve", "proxy"):
        assert f"## bbsmooth {command}\n" in page
    assert "--max-memory" in page and "--endpoint-id" in page  # options of the wire, nested
