"""Progress on stderr while a long step runs: a bar in a terminal, and a line every few seconds
anywhere else (a log file, a pipe, CI), so that a run sent to a log is never silent for long.

`with progress(name, total, unit) as advance: advance(k)`; `total` None when unknown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

LOG_EVERY = 5.0  # seconds between lines when stderr is not a terminal


class Progress(Protocol):
    """A progress display: `with progress(name, total, unit) as advance: advance(k)`."""

    def __call__(
        self, name: str, total: int | None, unit: str
    ) -> AbstractContextManager[Callable[[int], None]]: ...


@contextmanager
def no_progress(name: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    yield lambda k: None


@contextmanager
def progress_bar(name: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar when stderr is a terminal, else `progress_lines`."""
    if not sys.stderr.isatty():
        with progress_lines(name, total, unit) as advance:
            yield advance
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr) as bar:
        yield bar.update


@contextmanager
def progress_lines(
    name: str, total: int | None, unit: str, every: float = LOG_EVERY
) -> Iterator[Callable[[int], None]]:
    """One line on stderr each time `every` seconds have passed since the last (checked as the
    step advances), and a last one when a step that printed any ends: its total and time."""
    start = last = time.monotonic()
    done = 0
    printed = False

    def line(now: float) -> None:
        of = f"/{total:,}" if total else ""
        share = f" ({done / total:.0%})" if total else ""
        print(f"  {name}: {done:,}{of} {unit}{share}, {now - start:.0f}s", file=sys.stderr,
              flush=True)  # fmt: skip

    def advance(k: int) -> None:
        nonlocal done, last, printed
        done += k
        now = time.monotonic()
        if now - last >= every:
            line(now)
            last, printed = now, True

    yield advance
    if printed:
        line(time.monotonic())


def echo(line: str) -> None:
    """A line on stdout that does not tear a bar drawn on stderr (the bar steps aside)."""
    if "tqdm" in sys.modules and sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)
