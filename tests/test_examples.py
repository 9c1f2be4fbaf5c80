"""Every console example marked runnable in the README and docs/ runs, as it is written, against
the demo's model in a temporary folder: its commands exit as the page says and print what it
shows. The pages cannot drift from the code.

A runnable block is a ```console fence right after the marker `<!-- run -->` (or
`<!-- run: exit=N -->` when its last command must fail with N). Its `$ ` lines are commands (a
trailing backslash continues one); the lines after a command are its expected output: each must
match a line of what the command printed (stdout and stderr), in order, others may come between.
In an expected line `...` matches any text, a number written with a decimal point matches any
such number (a radius, a p-value, seconds) and a run of spaces any run; integers and words
match exactly.

A plain `bbsmooth …` command runs in process (tests/harness.cli); a line ending in ` &` is
started in the background, in its own process group, and stopped when the block ends; any
other line (curl, pipes) runs through bash. Blocks with a process of their own are marked
`process`, those that train or evaluate `slow`; the others run in the fast tier."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blackbox_smooth.demo import Plan, write_inputs
from blackbox_smooth.digits import train_digits_model

from .harness import ROOT, cli, stop_group

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- run(?:: exit=(\d+))? -->$")
SHELL = re.compile(r"[|&;<>$`()*?]|^\w+=")  # what makes a line bash's to run, not ours
DECIMAL = re.compile(r"\d+\.\d+")
BIN = str(Path(sys.executable).parent)  # where `bbsmooth` is installed


@dataclass(frozen=True)
class Command:
    line: str  # as typed, continuations joined
    expected: tuple[str, ...]

    @property
    def background(self) -> bool:
        return self.line.endswith("&")

    @property
    def in_process(self) -> bool:
        return self.line.startswith("bbsmooth ") and not SHELL.search(self.line)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the fence, 1-based
    commands: tuple[Command, ...]
    exit_code: int  # of the last command; every other one exits 0

    @property
    def name(self) -> str:
        return f"{self.page.stem}:{self.line}"

    @property
    def processes(self) -> bool:
        return any(not c.in_process for c in self.commands)

    @property
    def slow(self) -> bool:  # training or a data set: seconds of work, out of the fast tier
        return any(
            c.line.startswith(("bbsmooth train", "bbsmooth evaluate")) for c in self.commands
        )

    @property
    def marks(self) -> list[pytest.MarkDecorator]:
        return [pytest.mark.process] * self.processes + [pytest.mark.slow] * self.slow


def blocks(page: Path) -> list[Block]:
    """The runnable blocks of one page."""
    lines = page.read_text().splitlines()
    found = []
    for i, text in enumerate(lines):
        marker = MARKER.match(text.strip())
        if not marker:
            continue
        fence = i + 1
        assert lines[fence].strip() == "```console", (
            f"{page.name}:{i + 1}: a run marker must be followed by a ```console fence"
        )
        end = next(j for j in range(fence + 1, len(lines)) if lines[j].strip() == "```")
        found.append(Block(page, fence + 1, _commands(lines[fence + 1 : end]), int(marker[1] or 0)))
    return found


def _commands(body: list[str]) -> tuple[Command, ...]:
    commands: list[tuple[str, list[str]]] = []
    continuing = False
    for text in body:
        if continuing:
            commands[-1] = (commands[-1][0] + " " + text.strip(), commands[-1][1])
        elif text.startswith("$ "):
            commands.append((text[2:].strip(), []))
        elif text.strip():
            assert commands, f"output before the first command: {text!r}"
            commands[-1][1].append(text)
        continuing = text.endswith("\\")
        if continuing:
            commands[-1] = (commands[-1][0].removesuffix("\\").rstrip(), commands[-1][1])
    return tuple(Command(line, tuple(out)) for line, out in commands)


def pattern(expected: str) -> re.Pattern[str]:
    """One expected line as a regular expression: `...` any text, a decimal any decimal, and a
    run of spaces any run (a table's columns move with the width of what they hold)."""
    parts = []
    for piece in re.split(r"(\.\.\.|\d+\.\d+| +)", expected.rstrip()):
        if piece == "...":
            parts.append(".*")
        elif DECIMAL.fullmatch(piece):
            parts.append(r"\d+\.\d+")
        elif piece.startswith(" "):
            parts.append(" +")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def unmatched(expected: tuple[str, ...], *streams: str) -> str | None:
    """The first expected line that no stream prints after the lines matched before it, or
    None. Each stream (stdout, stderr) keeps its own order; a terminal interleaves them."""
    printed = [[line.rstrip() for line in stream.splitlines()] for stream in streams]
    at = [0] * len(streams)
    for line in expected:
        wanted = pattern(line)
        for s, lines in enumerate(printed):
            found = next((i for i in range(at[s], len(lines)) if wanted.fullmatch(lines[i])), None)
            if found is not None:
                at[s] = found + 1
                break
        else:
            return line
    return None


ALL = [block for page in PAGES for block in blocks(page)]


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """What `make demo` leaves in `.demo/` for the examples, made by the demo's own code: the
    black box (trained as the demo trains it), the digits it certifies, the training digits
    and a labelled held-out set."""
    root = tmp_path_factory.mktemp("demo-folder")
    train_digits_model(root / ".demo")
    write_inputs(root / ".demo", Plan().count)
    return root


@contextlib.contextmanager
def background() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            stop_group(proc)


def _servers(folder: Path) -> str:
    """What the background commands said: read for a failure's message only."""
    return "".join(
        f"\n[{log.name}]\n" + log.read_text(errors="replace")[-1500:]
        for log in sorted(folder.glob(".background-*.log"))
    )


def run(block: Block, folder: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    with background() as started:
        for k, command in enumerate(block.commands):
            where = f"{block.name}: `{command.line}`"
            if command.background:
                with open(folder / f".background-{k}.log", "wb") as log:
                    started.append(
                        subprocess.Popen(
                            ["bash", "-c", command.line.removesuffix("&")], cwd=folder,
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )  # fmt: skip
                continue
            if command.in_process:
                done = cli(shlex.split(command.line)[1:], cwd=folder)
            else:
                done = subprocess.run(
                    ["bash", "-c", command.line], cwd=folder, env=env, capture_output=True,
                    text=True, timeout=240,
                )  # fmt: skip
            printed = done.stdout + done.stderr
            last = k == len(block.commands) - 1
            wanted = block.exit_code if last else 0
            assert done.returncode == wanted, (
                f"{where} exited {done.returncode}, the page says {wanted}:\n{printed[-2000:]}{_servers(folder)}"
            )
            missing = unmatched(command.expected, done.stdout, done.stderr)
            assert missing is None, (
                f"{where} did not print a line like {missing!r}; it printed:\n{printed[-3000:]}{_servers(folder)}"
            )


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.name, marks=b.marks) for b in ALL],
)
def test_the_example_runs_as_written(block: Block, demo_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "example"
    shutil.copytree(demo_folder, folder)
    run(block, folder)


def test_every_console_block_is_run() -> None:
    """A ```console block shows a session a reader can repeat, so each one is marked runnable;
    an illustration that cannot run here (a vendor's key, a GPU) is a ```text block."""
    unmarked = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, text in enumerate(lines):
            if text.strip() == "```console":
                before = next((t for t in reversed(lines[:i]) if t.strip()), "")
                if not MARKER.match(before.strip()):
                    unmarked.append(f"{page.name}:{i + 1}")
    assert not unmarked, f"console blocks without a run marker: {unmarked}"


def test_the_pages_have_runnable_examples() -> None:
    """The tour in the README and the pages' examples are marked, so they are all run."""
    pages = {b.page.name for b in ALL}
    assert "README.md" in pages
    commands = " ".join(c.line for b in ALL for c in b.commands)
    for command in ("certify", "predict", "evaluate", "train", "proxy"):
        assert f"bbsmooth {command} " in commands, f"no runnable `bbsmooth {command}` example"


def test_an_expected_line_matches_only_what_it_says() -> None:
    output = "label 3  radius 0.412  p_lower 0.9987\nqueries 2,100 (12.3 s)\n"
    # a run of spaces is any run: a table's columns move with what they hold
    assert unmatched(("label 3 radius 0.41   p_lower ...",), output) is None
    # stdout and stderr each keep their order, but either may come first
    assert unmatched(("warning", "label ...", "queries ..."), output, "warning\n") is None
    assert unmatched(("label ...", "warning", "other"), output, "warning\n") is not None
    assert unmatched(("label 3  radius 0.50  p_lower 0.1",), output) is None
    assert unmatched(("label 4  radius 0.412  p_lower 0.9987",), output) is not None
    assert unmatched(("queries 2,100 ...",), output) is None
    assert unmatched(("queries 2,000 ...",), output) is not None
    # in order: a line expected after another must be printed after it
    assert unmatched(("queries ...", "label ..."), output) is not None
    assert unmatched(("label ...", "queries ..."), output) is None


def test_a_block_is_read_as_a_reader_reads_it(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n<!-- run: exit=2 -->\n```console\n$ bbsmooth certify a.png \\\n"
        "    --sigma 0.5\nlabel ...\n\n$ curl -s x &\n```\n"
    )
    (block,) = blocks(page)
    assert block.exit_code == 2 and block.line == 3
    first, second = block.commands
    assert first.line == "bbsmooth certify a.png --sigma 0.5" and first.in_process
    assert first.expected == ("label ...",)
    assert second.background and not second.in_process and block.processes
