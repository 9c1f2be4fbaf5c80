"""Harness shared by the reliability tests and the benchmarks that repeat them at length
(benchmarks/crash_kill.py, benchmarks/load.py): run `bbsmooth` in a child process and watch it
from outside, kill it at random moments, check what it left on disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from blackbox_smooth.cache import DATABASE, TABLE, Seal, decode
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split
from blackbox_smooth.evaluate import read_tsv
from blackbox_smooth.frontends import from_pretrained
from blackbox_smooth.runfolder import MARKER
from blackbox_smooth.serve import InferenceServer

from .faults import FaultPlan, FaultyServer

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serving(
    command: list[str],
    ready: str,
    log: Path,
    env: dict | None = None,
    within: float = 120,
    verify: ssl.SSLContext | bool = True,
) -> Iterator[subprocess.Popen]:
    """A real serving product started as `command` in its own process group (its workers
    included), once GET `ready` answers 200 (over HTTPS: `verify` trusts its CA); stopped (SIGTERM, then SIGKILL) afterwards. A
    server that exits or is not ready `within` seconds fails the test with its log's tail."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
            start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + within
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{command[0]} exited: " + log.read_text()[-2000:])
                try:
                    if httpx.get(ready, timeout=2, verify=verify).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{command[0]} was not ready in {within:.0f} s")
                time.sleep(0.5)
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started in its own group, its children included: SIGTERM, then SIGKILL
    after 30 s. One the test already stopped is left alone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def write_digits_folder(root: Path, count: int) -> Path:
    """The first `count` held-out digits as PNGs, one sub-folder per class."""
    _, _, x, y = digits_split()
    for i in range(count):
        (root / str(y[i])).mkdir(parents=True, exist_ok=True)
        save_image(x[i], root / str(y[i]) / f"{i:03d}.png")
    return root


def _command(args: list) -> list[str]:
    return [sys.executable, "-m", "blackbox_smooth", *map(str, args)]


class _Routed:
    """sys.stdout or sys.stderr during an in-process run: the command's writes are captured;
    the writes of the test's own loopback servers (their request threads, which share this
    process) go where they went before, as they would from another process."""

    def __init__(self, capture: Any, original: Any) -> None:
        self.capture, self.original = capture, original

    def _target(self) -> Any:
        name = threading.current_thread().name
        server = "process_request_thread" in name or "serve_forever" in name
        return self.original if server else self.capture

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return False


def cli(args: list, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`bbsmooth ARGS…` in this process, as `bbsmooth` runs it (its `main`, exit code, one-line
    errors), with stdout and stderr captured, `env` set and `cwd` the working folder for the
    call: the fast way for every case where the process itself is not the point."""
    import contextlib
    import io

    from blackbox_smooth import cli as command_line

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env or {}}
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    code: int | str | None = 0
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        sys.argv = ["bbsmooth", *map(str, args)]
        os.chdir(cwd)
        stdout, stderr = _Routed(out, sys.stdout), _Routed(err, sys.stderr)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                command_line.main()
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


def bbsmooth(args: list, timeout: float = 240, env: dict | None = None):
    """`bbsmooth ARGS…` in a subprocess, as a user runs it."""
    return subprocess.run(_command(args), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})  # fmt: skip


@dataclass
class Watched:
    """A command run in its own process, sampled every `interval` seconds from outside."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float
    seconds: float
    fds: list[int] = field(default_factory=list)
    sockets: list[int] = field(default_factory=list)

    @property
    def fd_growth(self) -> int:
        """Descriptors open in the last quarter of the busy part of the run (sockets open:
        start-up and shutdown left out) beyond the most in its first half."""
        busy = [f for f, s in zip(self.fds, self.sockets, strict=True) if s > 0]
        q = max(1, len(busy) // 4)
        return max(0, max(busy[-q:], default=0) - max(busy[: 2 * q], default=0))


def watch(args: list, interval: float = 0.05) -> Watched:
    """`bbsmooth ARGS` in a child process; its peak RSS from wait4, its descriptors from /proc."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(_command(args), cwd=ROOT, stdout=out, stderr=err)
        fds: list[int] = []
        sockets: list[int] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                         for fd in os.listdir(f"/proc/{proc.pid}/fd")]  # fmt: skip
            except OSError:  # exiting between the checks
                links = []
            if links:
                fds.append(len(links))
                sockets.append(sum(link.startswith("socket:") for link in links))
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Watched(proc.returncode, out.read(), err.read(), usage.ru_maxrss / 1024, seconds,
                       fds, sockets)  # fmt: skip


def peak_mib(pid: int) -> float:
    """A running process's own high-water mark of resident memory (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


@dataclass
class Heard:
    """A command run in its own process with its output read from a pipe, as a log reads it."""

    returncode: int
    output: str  # stdout and stderr together
    peak_rss_mib: float
    seconds: float
    longest_silence: float  # seconds between two lines (or the start, or the end)
    after: str  # the line the longest silence followed


def listen(args: list, env: dict[str, str] | None = None) -> Heard:
    """`bbsmooth ARGS` in a child process, stdout and stderr through one pipe (no terminal:
    progress comes as lines); the longest gap between lines, and its peak RSS from wait4."""
    start = last = time.monotonic()
    longest, after, lines = 0.0, "(the start)", []
    proc = subprocess.Popen(_command(args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    assert proc.stdout is not None
    # The child's own high-water mark, read from /proc while it runs: wait4's ru_maxrss starts
    # from the parent's size at the fork (a pytest process of 1.6 GB).
    high = [0.0]
    done = threading.Event()

    def look() -> None:
        with contextlib.suppress(OSError, StopIteration):  # not there yet, or gone
            high[0] = max(high[0], peak_mib(proc.pid))

    def sample() -> None:
        while not done.is_set():
            look()
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        now = time.monotonic()
        if now - last > longest:
            longest, after = now - last, lines[-1].strip() if lines else "(the start)"
        last = now
        lines.append(line)
    done.set()
    sampler.join()
    look()  # a last look before it is reaped (its pipe closed as it exits)
    _, status, _ = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    end = time.monotonic()
    if end - last > longest:
        longest, after = end - last, lines[-1].strip() if lines else "(the start)"
    return Heard(proc.returncode, "".join(lines), high[0], end - start, longest, after)


def kill_then_finish(args: list, kills: int, rng: np.random.Generator, span: float):
    """Start `bbsmooth ARGS`, SIGKILL it after a random delay in [0.3, span] s, `kills` times;
    then run it to the end. Returns the finishing run and the number of kills that landed."""
    landed = 0
    for _ in range(kills):
        proc = subprocess.Popen(_command(args), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, span))
        if proc.poll() is None:
            proc.kill()
            landed += 1
        proc.wait()
    return bbsmooth(args), landed


def resent(server: InferenceServer) -> int:
    """Requests answered more than once."""
    return sum(count - 1 for count in server.answered.values())


def cache_rows(cache: Path) -> dict[str, tuple[int, bytes]]:
    """Every row of our table in a cache folder, read with SQLite directly: key → (kind,
    value as stored)."""
    if not (cache / DATABASE).exists():
        return {}
    with contextlib.closing(sqlite3.connect(cache / DATABASE)) as db:
        made = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        if db.execute(made, (TABLE,)).fetchone() is None:  # the file is made before its table
            return {}
        rows = db.execute(f"SELECT key, kind, value FROM {TABLE}").fetchall()
    return {key: (kind, bytes(value)) for key, kind, value in rows}


def damaged_cache_entries(cache: Path) -> tuple[int, int]:
    """(entries, damaged entries) of a cache directory: an entry is an answered block or a
    journal record, each sealed with a digest of its key and body."""
    rows = cache_rows(cache)
    seal = Seal(None)
    damaged = 0
    for key, (kind, value) in rows.items():
        body = seal.open(key, value)
        if body is None or (kind == 0 and decode(body) is None):
            damaged += 1
    return len(rows), damaged


@dataclass(frozen=True)
class Crashes:
    kills: int  # that landed while the command ran
    resent: int  # requests answered twice (in flight at a kill)
    same: bool  # the final result equals the uninterrupted run's
    entries: int  # cache entries left
    damaged: int  # of those, damaged


def crash_and_compare(model: Any, case: Case, tmp: Path, kills: int, seed: int) -> Crashes:
    """The case's command run clean, then killed `kills` times at random moments and run again
    to the end; their results compared."""

    def line(url: str, out: Path) -> list:
        command, *rest = case.args(out)
        return [command, "-e", url, *rest]

    with InferenceServer(model, name="digits", delay=0.05) as clean:
        start = time.monotonic()
        done = bbsmooth([*line(clean.url, tmp / "clean"), "--no-cache"])
        assert done.returncode == 0, done.stderr
        span = 0.8 * (time.monotonic() - start)
        expected = case.result(tmp / "clean", done)
    cache = tmp / "cache"
    with InferenceServer(model, name="digits", delay=0.05, record=True) as server:
        crashed = [*line(server.url, tmp / "crashed"), "--cache", cache]
        final, landed = kill_then_finish(crashed, kills, np.random.default_rng(seed), span)
        assert final.returncode == 0, final.stderr
        twice = resent(server)
    entries, damaged = damaged_cache_entries(cache)
    same = case.result(tmp / "crashed", final) == expected
    return Crashes(landed, twice, same, entries, damaged)


# -- the three long-running commands, each a command line and how to read its result -----------

CONCURRENCY = 4


@dataclass(frozen=True)
class Case:
    name: str
    args: Callable[[Path], list]  # the command line after `bbsmooth`, given its output path
    result: Callable[[Path, Any], Any]  # what must come out the same, from (out, completed)


def certify_case(image: Path) -> Case:
    def result(_: Path, done: Any) -> tuple:
        cert = json.loads(done.stdout)
        return cert["label"], cert["radius"], cert["counts"]

    return Case("certify", lambda _: ["certify", image, "--sigma", "0.25", "--n", "4000",
                                      "--batch", "50", "--concurrency", CONCURRENCY, "--json"],
                result)  # fmt: skip


def evaluate_case(folder: Path) -> Case:
    def result(out: Path, _: Any) -> list:
        # no temporary left behind, inside or beside the folder (only the run marker)
        assert [p.name for p in out.glob(".*")] == [MARKER]
        assert not list(out.parent.glob(f".{out.name}.*"))
        rows = read_tsv(out / "certify.tsv")
        return [(r.idx, r.label, r.predict, r.radius, r.correct, r.queries) for r in rows]

    return Case("evaluate", lambda out: ["evaluate", "--data", folder, "--sigma", "0.25",
                                         "--n0", "50", "--n", "500", "--every", "10",
                                         "--out", out, "--batch", "50",
                                         "--concurrency", CONCURRENCY], result)  # fmt: skip


def train_case(folder: Path) -> Case:
    def result(run: Path, _: Any) -> tuple:
        from_pretrained(run, torch.device("cpu"))  # loads whole
        assert not list(run.parent.glob(f".{run.name}.*"))  # no half-swapped folder left
        config = json.loads((run / "frontend.json").read_text())
        curve = [{k: v for k, v in e.items() if k != "seconds"} for e in config["validation"]]
        return (run / "frontend.safetensors").read_bytes(), curve

    return Case("train", lambda out: ["train", "--data", folder, "--sigma", "0.5", "--out", out,
                                      "--epochs", "3", "--max-queries", "1500",
                                      "--pretrain-epochs", "1", "--resume", "--batch", "50",
                                      "--concurrency", CONCURRENCY], result)  # fmt: skip


# A stall outlasts the client's timeout; retries are many so that random faults never exhaust them.
FAULT_TOLERANT = ["--timeout", "1", "--retries", "12"]


@dataclass(frozen=True)
class Faults:
    injected: int  # faults the server injected (all survived when the run finished)
    same: bool  # the result equals a fault-free run's


def faults_and_compare(model: Any, case: Case, tmp: Path, plan: FaultPlan) -> Faults:
    """The case's command against a healthy server, then against one injecting `plan`."""
    results = []
    for name, faults in (("clean", None), ("faulty", plan)):
        with FaultyServer(model, name="digits", faults=faults, stall=1.5) as server:
            command, *rest = case.args(tmp / name)
            done = bbsmooth([command, "-e", server.url, *rest, *FAULT_TOLERANT, "--no-cache"])
            assert done.returncode == 0, done.stderr
            results.append(case.result(tmp / name, done))
    return Faults(server.faults_injected, results[0] == results[1])
