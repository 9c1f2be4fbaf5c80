"""Write docs/cli.md, the command-line reference, from the commands' own --help: every flag,
its default and its help come from their one declaration in blackbox_smooth/options/.

    python docs/cli_reference.py          # rewrite docs/cli.md
    python docs/cli_reference.py --check  # exit 1 if docs/cli.md is out of date

tests/test_docs.py fails when the committed page differs from what this writes."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from blackbox_smooth.cli import app

PAGE = Path(__file__).resolve().parent / "cli.md"
WIDTH = 100  # the help as a terminal of this width shows it: fixed, so the page is reproducible


def _help(command: click.Command, name: str, parent: click.Context) -> str:
    ctx = click.Context(
        command, info_name=name, parent=parent, terminal_width=WIDTH, max_content_width=WIDTH
    )
    return command.get_help(ctx).rstrip()


def reference() -> str:
    """The whole page: the program's help, then each command's (cache's subcommands too)."""
    group = typer.main.get_command(app)
    root = click.Context(group, info_name="bbsmooth", terminal_width=WIDTH, max_content_width=WIDTH)
    parts = [
        "# Command-line reference\n",
        "Generated from the commands' own `--help` by `docs/cli_reference.py`; every flag, its "
        "default and its help are declared once, in `blackbox_smooth/options/`.\n",
        f"```\n{_help(group, 'bbsmooth', None)}\n```\n",
    ]
    for name in group.list_commands(root):
        command = group.get_command(root, name)
        parts.append(f"## bbsmooth {name}\n\n```\n{_help(command, name, root)}\n```\n")
        if hasattr(command, "list_commands"):  # `cache`: info, clear
            ctx = click.Context(command, info_name=name, parent=root)
            for sub in command.list_commands(ctx):
                inner = command.get_command(ctx, sub)
                parts.append(f"### bbsmooth {name} {sub}\n\n```\n{_help(inner, sub, ctx)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = reference()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if PAGE.exists() and PAGE.read_text() == text else 1)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
