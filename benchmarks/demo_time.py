"""`make demo` as a newcomer runs it, after set-up: wall time, the longest silence in its output
(sent to a pipe, as to a log: no terminal, so no bars), and a rerun while port 18080 is taken
by someone else (it must find its cache and send nothing but the canary). One table, then
`RESULT …`.

Goals: the first run under 300 s on 2 idle cores; no silence over 10 s; the rerun sends 24
queries: the canary, 8 cached samples asked again before each of its three certification runs.

Run: `make bench-demo` (or .venv/bin/python -m benchmarks.demo_time).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORT = 18080  # the demo's first choice


def run_demo(folder: Path) -> tuple[float, float, str]:
    """One `python -m blackbox_smooth.demo` in `folder`: its wall seconds, the longest gap
    between two lines of its output (stdout and stderr together, through a pipe), the output."""
    start = last = time.monotonic()
    longest = 0.0
    lines = [""]
    after = ""
    with subprocess.Popen(
        [sys.executable, "-u", "-m", "blackbox_smooth.demo"],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            if now - last > longest:
                longest, after = now - last, lines[-1].strip()
            last = now
            lines.append(line)
        code = proc.wait()
    longest = max(longest, time.monotonic() - last)
    output = "".join(lines)
    print(f"longest silence {longest:.1f} s, after: {after[:100] or '(the start)'}", flush=True)
    if code:
        raise SystemExit(f"the demo failed (exit {code}):\n{output[-3000:]}")
    return time.monotonic() - start, longest, output


def sent(output: str) -> int:
    """Queries the run sent: certification's and training's, as the demo prints them."""
    certified = re.search(r"certification: ([\d,]+) queries sent now", output)
    trained = re.search(r"queries \(([\d,]+) sent now\)", output)
    assert certified and trained, output[-2000:]
    return sum(int(m[1].replace(",", "")) for m in (certified, trained))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        first, first_silence, first_out = run_demo(folder)
        with socket.socket() as busy:  # someone else's server on the demo's port
            try:
                busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
                busy.bind(("127.0.0.1", PORT))
                busy.listen()
            except OSError:
                pass  # taken already
            again, again_silence, again_out = run_demo(folder)
    rows = [
        ("first run (trains the CNN and the front end)", f"{first:.0f} s", f"{first_silence:.1f} s",
         f"{sent(first_out):,}"),
        (f"rerun, port {PORT} taken", f"{again:.0f} s",
         f"{again_silence:.1f} s", f"{sent(again_out):,}"),
    ]  # fmt: skip
    head = ("make demo, after set-up", "wall", "longest silence", "queries sent")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"RESULT demo_seconds={first:.0f} rerun_seconds={again:.0f} "
        f"max_silence_seconds={max(first_silence, again_silence):.1f} "
        f"rerun_queries_sent={sent(again_out)}"
    )


if __name__ == "__main__":
    main()
