"""Progress on stderr while a long step runs: a bar in a terminal, and a line every few seconds
anywhere else (a log file, a pipe, CI), so that a run sent to a log is never silent for long.

`with progress(name, total, unit) as advance: advance(k)`; `total` None when unknown.
"""

from __future__ import annotations

import sys
import threading
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
    """A tqdm bar when stderr is a terminal, else `progress_lines`. The bar is redrawn every
    second even while one step runs long, so its clock shows that work goes on."""
    if not sys.stderr.isatty():
        with progress_lines(name, total, unit) as advance:
            yield advance
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr)
    with bar, _heartbeat(1.0, bar.refresh):
        yield bar.update


# The steps open now, innermost last: in a log only the innermost speaks between advances,
# so nested steps (an epoch inside a run) do not print a line each.
_open: list[object] = []
_open_lock = threading.Lock()


@contextmanager
def _heartbeat(every: float, beat: Callable[[], None]) -> Iterator[None]:
    """Call `beat` every `every` seconds from a daemon thread while the block runs."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            beat()

    thread = threading.Thread(target=run, name="bbsmooth-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def progress_lines(
    name: str, total: int | None, unit: str, every: float = LOG_EVERY
) -> Iterator[Callable[[int], None]]:
    """One line on stderr every `every` seconds while the step runs, whether or not it has
    advanced (one forward pass at a large image size can take longer than that: a log that
    stops looks like a hang), and a last one when a step that printed any ends."""
    start = last = time.monotonic()
    done = 0
    printed = False
    token = object()
    lock = threading.Lock()

    def line(now: float) -> None:
        nonlocal last, printed
        of = f"/{total:,}" if total else ""
        share = f" ({done / total:.0%})" if total else ""
        print(f"  {name}: {done:,}{of} {unit}{share}, {now - start:.0f}s", file=sys.stderr,
              flush=True)  # fmt: skip
        last, printed = now, True

    def advance(k: int) -> None:
        nonlocal done
        with lock:
            done += k
            now = time.monotonic()
            if now - last >= every:
                line(now)

    def beat() -> None:
        with _open_lock:
            innermost = bool(_open) and _open[-1] is token
        with lock:
            now = time.monotonic()
            if innermost and now - last >= every:
                line(now)

    with _open_lock:
        _open.append(token)
    try:
        with _heartbeat(max(every / 4, 0.05), beat):
            yield advance
    finally:
        with _open_lock:
            _open.remove(token)
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
