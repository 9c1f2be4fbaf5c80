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


def test_the_readme_is_an_introduction_the_site_holds_the_rest():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md over 250 lines: move the detail to docs/"
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"
        if page.name != "index.md":
            assert f"docs/{page.name}" in readme or page.name == "changelog.md", (
                f"the README's documentation list does not link docs/{page.name}"
            )
