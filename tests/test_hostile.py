"""The hostile corpus: a server that tries every way to hurt its client, and commands aimed at
the user's own files. Each case runs `bbsmooth` as a child process (the process is the point:
its time and address space are bounded from outside) with the key in its environment, and for
every case: the exit code is one of 0, 2, 3, 4 (never a traceback's 1), a failure is one line
on stderr, no run of 8 characters of the key appears anywhere (stdout, stderr, the cache, the
output folders), no escape sequence reaches the terminal, and the user's files are
byte-identical afterwards."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.data import save_image
from blackbox_smooth.errors import BBSmoothError

from .harness import ROOT
from .hostile import MODES, SLOW, HostileServer, hostile_transport

KEY = "hf_Zq8/Xk-9Lm2+Pw7Rt4Vy6Bn1Cd3Ef5Gh"
ADDRESS_SPACE = 1536 << 20  # a run needs about 1 GiB of address space (torch and its libraries)
SECONDS = 60  # the slowest case (a trickling server, three tries of 2 s) takes about 9 alone


def key_pieces(blob: str | bytes) -> list[str]:
    """Runs of 8 characters of the key found in `blob` (ASCII case ignored)."""
    text = (blob.decode("latin-1") if isinstance(blob, bytes) else blob).lower()
    return [KEY[i : i + 8] for i in range(len(KEY) - 7) if KEY[i : i + 8].lower() in text]


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run(args: list, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bbsmooth ARGS` in a child with bounded time and address space, the key in its env."""
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "blackbox_smooth", *map(str, args)],
        capture_output=True, text=True, timeout=SECONDS, cwd=cwd, preexec_fn=_limit,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "BBSMOOTH_API_KEY": KEY,
             "BBSMOOTH_CACHE": str(cwd / "user-cache"), **(env or {})},
    )  # fmt: skip
    done.seconds = time.monotonic() - start  # type: ignore[attr-defined]
    return done


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def user_files(home: Path) -> dict[str, bytes]:
    """Everything but the caches (which a run may fill)."""
    return {k: v for k, v in snapshot(home).items() if not k.startswith(("cache", "user-cache"))}


@pytest.fixture(scope="module")
def hostile():
    with HostileServer() as server:
        yield server


@pytest.fixture(scope="module")
def home(tmp_path_factory, hostile):
    """A user's folder: an image, a data set, notes, and an evaluation made before."""
    home = tmp_path_factory.mktemp("home")
    from blackbox_smooth.digits import digits_split

    _, _, x, y = digits_split()
    save_image(x[0], home / "digit.png")
    for i in range(4):
        (home / "data" / str(y[i])).mkdir(parents=True, exist_ok=True)
        save_image(x[i], home / "data" / str(y[i]) / f"{i}.png")
    (home / "notes").mkdir()
    (home / "notes" / "thesis.txt").write_text("four years of work\n")
    (home / "todo.txt").write_text("buy milk\n")
    (home / "figure.png").write_bytes((home / "digit.png").read_bytes())
    done = run(["evaluate", "--data", "data", "-e", hostile.url("good"), "--protocol",
                "huggingface", *SMOOTH, "--out", "before", "--cache", "cache"], home)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home


SMOOTH = ["--sigma", "0.25", "--n0", "2", "--n", "4", "--alpha", "0.2", "--retries", "2"]
HF = ["--protocol", "huggingface"]
OIP = ["--input-layout", "nchw", "--input-dtype", "fp32", "--input-name", "input-0"]
V2 = "/v2/models/m/infer"

# name: (command line after `bbsmooth`, {HOST…} filled in, exit code, words in its output)
SERVER_CASES = {
    "the key as a label, certify": (["certify", "digit.png", "-e", "{hf:key-as-label}", *HF],
                                    2, "label names such as '***'"),
    "the key as a label, labels": (["labels", "digit.png", "-e", "{hf:key-as-label}", *HF],
                                   0, "***"),
    "the key inside a label object": (["certify", "digit.png", "-e",
                                       "{hf:key-in-label-object}", *HF], 3, "<dict of 1>"),
    "the key at offset 150": (["certify", "digit.png", "-e", "{hf:key-at-offset-150}", *HF],
                              3, "HTTP 400"),
    "the key at offset 195": (["certify", "digit.png", "-e", "{hf:key-at-offset-195}", *HF],
                              3, "HTTP 400"),
    "the key at offset 199": (["certify", "digit.png", "-e", "{hf:key-at-offset-199}", *HF],
                              3, "HTTP 400"),
    "the key percent-encoded": (["certify", "digit.png", "-e", "{hf:key-percent-encoded}", *HF],
                                3, "***"),
    "the key JSON-escaped": (["certify", "digit.png", "-e", "{hf:key-json-escaped}", *HF],
                             3, "***"),
    "the key upper-cased": (["certify", "digit.png", "-e", "{hf:key-uppercased}", *HF],
                            3, "***"),
    "the key in a Cloud Vision error": (["certify", "digit.png", "-e",
                                         "{plain:key-in-gcv-error}", "--protocol", "gcv"],
                                        2, "could not label image 0"),
    "the key in a redirect": (["certify", "digit.png", "-e", "{hf:key-in-redirect}", *HF],
                              3, "redirect to"),
    "the key as a datatype": (["certify", "digit.png", "-e", "{v2:key-in-datatype}", *OIP],
                              3, "non-numeric datatype"),
    "a 307 carrying an answer": (["certify", "digit.png", "-e", "{v2:redirect-with-answer}",
                                  *OIP], 3, "a redirect to http://127.0.0.1:9/elsewhere"),
    "an empty 302": (["certify", "digit.png", "-e", "{hf:redirect-empty}", *HF], 3,
                     "a redirect to https://other.example/infer:"),
    "a 2 GB body announced": (["certify", "digit.png", "-e", "{hf:huge-declared}", *HF], 3,
                              "announced 2,000,000,000 bytes"),
    "an endless chunked body": (["certify", "digit.png", "-e", "{hf:endless-chunked}", *HF], 3,
                                "answered more than"),
    "a 600 MB gzip bomb": (["certify", "digit.png", "-e", "{hf:gzip-bomb}", *HF], 3,
                           "answered more than"),
    "three million labels": (["certify", "digit.png", "-e", "{hf:three-million-labels}", *HF],
                             3, "answered more than"),
    "twenty thousand labels": (["certify", "digit.png", "-e", "{hf:many-labels}", *HF], 3,
                               "20,000 labels"),
    "an encoding we did not ask for": (["certify", "digit.png", "-e", "{hf:brotli}", *HF], 3,
                                       "content-encoding"),
    "JSON nested 100,000 deep": (["certify", "digit.png", "-e", "{hf:deep-json}", *HF], 3,
                                 "not valid JSON"),
    "a label of 23 digits": (["certify", "digit.png", "-e", "{hf:huge-label-string}", *HF], 2,
                             "label names such as"),
    "a class index of 1e23": (["certify", "digit.png", "-e", "{v2:huge-class-index}", *OIP], 3,
                              "out of range"),
    "a 20 MB label": (["certify", "digit.png", "-e", "{hf:twenty-megabyte-label}", *HF], 2,
                      "label names such as 'AAAA"),
    "a 20 MB label, labels": (["labels", "digit.png", "-e", "{hf:twenty-megabyte-label}", *HF],
                              0, "AAAA"),
    "escape sequences in an error": (["certify", "digit.png", "-e", "{hf:escapes-in-error}",
                                      *HF], 3, "nope"),
    "escape sequences in a label": (["labels", "digit.png", "-e", "{hf:escapes-in-label}", *HF],
                                    0, "cat"),
    "an answer that is not JSON": (["certify", "digit.png", "-e", "{hf:not-json}", *HF], 3,
                                   "not valid JSON"),
    "Retry-After of a year": (["certify", "digit.png", "-e", "{hf:retry-after-a-year}", *HF], 3,
                              "try again later"),
    "a body at one byte per half second": (["certify", "digit.png", "-e", "{hf:slow-body}", *HF],
                                           3, "longer than --timeout 2s"),
    "headers at one byte per half second": (["certify", "digit.png", "-e", "{hf:slow-headers}",
                                             *HF], 3, "longer than --timeout 2s"),
    "metadata headers at one byte per half second": (
        ["certify", "digit.png", "-e", "{v2:slow-headers}"], 3, "GET"),
    "401 into an earlier evaluation": (
        ["evaluate", "--data", "data", "-e", "{hf:unauthorized}", *HF, "--out", "before"], 3,
        "HTTP 401"),
    "a label error into an earlier evaluation": (
        ["evaluate", "--data", "data", "-e", "{hf:key-as-label}", *HF, "--out", "before"], 2,
        "label names"),
    "too small a budget into an earlier evaluation": (
        ["evaluate", "--data", "data", "-e", "{hf:good}", *HF, "--out", "before", "--seed", "7",
         "--max-queries", "5"], 4, "max-queries"),
}  # fmt: skip

FILE_CASES = {
    "train into a folder of the user's": (["train", "--out", "notes"], "not written by bbsmooth"),
    "train into the current folder": (["train", "--out", "."], "holds this command's input"),
    "train into a file": (["train", "--out", "todo.txt"], "is not a folder"),
    "train into its own data": (["train", "--out", "data"], "holds this command's input"),
    "train inside its own data": (["train", "--out", "data/3/run"], "lies inside this command"),
    "train into an evaluation": (["train", "--out", "before"], "holds a bbsmooth evaluation"),
    "evaluate into a file": (["evaluate", "--out", "todo.txt"], "is not a folder"),
    "evaluate into the user's folder": (["evaluate", "--out", "notes"], "not written by bbsmooth"),
    "evaluate into its cache": (["evaluate", "--out", "cache", "--cache", "cache"],
                                "holds this command's input"),
    "plot over the user's picture": (["plot", "before/certify.tsv", "--out", "figure.png"],
                                     "not written by bbsmooth"),
    "plot over its own input": (["plot", "before/certify.tsv", "--out", "before/certify.tsv"],
                                "one of this command's inputs"),
    "a key ending in CR": (["certify", "digit.png"], "$BBSMOOTH_API_KEY holds whitespace"),
    "a URL with port 99999": (["certify", "digit.png", "-e", "http://127.0.0.1:99999/p"],
                              "not valid"),
}  # fmt: skip


def _fill(args: list[str], server: HostileServer) -> list[str]:
    out = []
    for a in args:
        if a.startswith("{") and ":" in a:
            kind, mode = a.strip("{}").split(":")
            a = server.url(mode, V2 if kind == "v2" else "/infer")
        out.append(a)
    return out


def _check(done: subprocess.CompletedProcess, code: int, says: str, home: Path, before) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == code, (done.returncode, done.stderr[-2000:])
    assert says in output, output[-2000:]
    if code:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("bbsmooth: error:")
    assert "Traceback" not in output and "\x1b" not in output and "\u202e" not in output
    assert max(map(len, output.splitlines()), default=0) <= 2100  # readable lines only
    assert not key_pieces(output), key_pieces(output)
    stored = b"".join(snapshot(home).values())
    assert not key_pieces(stored)
    assert user_files(home) == before
    assert done.seconds < SECONDS


def _server_command(case: str, server: HostileServer) -> tuple[list, dict | None]:
    args, _, _ = SERVER_CASES[case]
    if args[0] == "labels":
        return _fill(args, server), None
    # a short deadline where a trickle is the case; elsewhere one a loaded machine keeps
    slow = any(f":{mode}}}" in a for a in args for mode in SLOW)
    deadline = ["--timeout", "2" if slow else "20"]
    return [*_fill(args, server), *SMOOTH, *deadline, "--cache", "cache"], None


def _file_command(case: str, server: HostileServer) -> tuple[list, dict | None]:
    args, _ = FILE_CASES[case]
    endpoint = ["-e", server.url("good"), *HF] if "-e" not in args and args[0] != "plot" else []
    data = ["--data", "data"] if args[0] in ("train", "evaluate") else []
    smooth = ["--sigma", "0.25"] if args[0] != "plot" else []
    env = {"BBSMOOTH_API_KEY": KEY + "\r"} if "CR" in case else None
    return [*args, *endpoint, *data, *smooth], env


@pytest.fixture(scope="module")
def launched(request, hostile, home):
    """The selected cases started at once, three at a time (a case mostly waits: on the
    server, on torch's import), in the tests' order; the user's files taken before all of
    them: none may change them. Starting takes no time: each test waits for its own case
    only, under its own timeout (the cases before it are done by then)."""
    before = user_files(home)
    chosen = {
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and "case" in getattr(item, "callspec", _NoCase).params
    }
    commands = {name: _server_command(name, hostile) for name in SERVER_CASES if name in chosen}
    commands.update({name: _file_command(name, hostile) for name in FILE_CASES if name in chosen})
    pool = ThreadPoolExecutor(3)
    futures = {name: pool.submit(run, args, home, env) for name, (args, env) in commands.items()}
    yield before, futures
    pool.shutdown(wait=True, cancel_futures=True)


class _NoCase:
    params: dict = {}


@pytest.mark.process
@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_a_hostile_server_gets_one_line_and_no_key(case, launched, home):
    _, code, says = SERVER_CASES[case]
    before, futures = launched
    _check(futures[case].result(), code, says, home, before)


@pytest.mark.process
@pytest.mark.parametrize("case", list(FILE_CASES))
def test_commands_never_touch_what_they_did_not_create(case, launched, home):
    _, says = FILE_CASES[case]
    before, futures = launched
    _check(futures[case].result(), 2, says, home, before)
    assert not [p for p in home.iterdir() if ".bbsmooth-" in p.name]  # no temporary left


# What the adapters make of each hostile body, in process through an injected transport (the
# process cases above add the bounds on time and memory, and the CLI's output): one error that
# says what went wrong, with no piece of the key and no control character.
BODY_CASES = {
    mode: (kind, says)
    for args, _, says in SERVER_CASES.values()
    if args[0] == "certify" and args[3].startswith("{")
    for kind, mode in [args[3].strip("{}").split(":")]
    if mode not in SLOW
} | {"escapes-in-label": ("hf", "label names such as")}  # asked only by `labels` above


@pytest.mark.parametrize("mode", list(BODY_CASES))
def test_a_hostile_body_is_one_error_without_the_key_in_process(mode, monkeypatch):
    kind, says = BODY_CASES[mode]
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    wire = {"hf": {"protocol": "huggingface"}, "plain": {"protocol": "gcv"},
            "v2": {"input_layout": "nchw", "input_dtype": "fp32", "input_name": "input-0"}}[kind]  # fmt: skip
    path = V2 if kind == "v2" else "/infer"
    options = EndpointOptions(retries=2, backoff=0.01, max_backoff=0.02, timeout=20, **wire)
    box = open_blackbox(
        f"http://127.0.0.1/{mode}{path}", options, httpx_transport=hostile_transport()
    )
    with pytest.raises(BBSmoothError) as err:
        asyncio.run(box.classify(torch.rand(1, 1, 8, 8)))
    message = str(err.value)
    assert says in message and not key_pieces(message), message
    assert not any(c in message for c in "\x1b\x07\u202e\n"), message


def test_every_mode_but_the_slow_ones_is_asked_in_process():
    assert set(BODY_CASES) == set(MODES) - {"good", "unauthorized"}


@pytest.mark.process
def test_the_earlier_evaluation_is_whole_and_a_new_one_replaces_it(hostile, home, tmp_path):
    """After the failed runs above, the evaluation folder is as it was; a successful run into
    it replaces it whole (it is ours) and leaves no temporary beside it."""
    summary = json.loads((home / "before" / "summary.json").read_text())
    assert summary["images"] == 4
    work = tmp_path / "w"
    work.mkdir()
    (work / "data").symlink_to(home / "data")
    first = run(["evaluate", "--data", "data", "-e", hostile.url("good"), *HF, *SMOOTH,
                 "--out", "ev", "--cache", "cache"], work)  # fmt: skip
    again = run(["evaluate", "--data", "data", "-e", hostile.url("good"), *HF, *SMOOTH,
                 "--out", "ev", "--cache", "cache", "--limit", "2"], work)  # fmt: skip
    assert first.returncode == again.returncode == 0, again.stderr
    assert json.loads((work / "ev" / "summary.json").read_text())["images"] == 2
    assert sorted(p.name for p in work.iterdir()) == ["cache", "data", "ev"]
