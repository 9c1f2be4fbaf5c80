"""A newcomer's first hour: --version, -h, completion, the cache commands, the σ warning,
--endpoint-id, errors that say what differs, failing fast before torch loads, and output that
arrives as it is made."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stderr
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.data import save_image
from blackbox_smooth.progress import progress_lines
from blackbox_smooth.serve import InferenceServer

from .conftest import ROOT, messages, run_cli, write_linear


def _sent(stdout: str) -> int:
    m = re.search(r"queries: ([\d,]+) sent", stdout)
    assert m, stdout
    return int(m[1].replace(",", ""))


def test_version_short_help_and_argument_names():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bbsmooth {version('blackbox_smooth')}"
    r = run_cli("-h")
    assert r.returncode == 0 and "certify" in r.stdout and "cache" in r.stdout
    r = run_cli("certify", "-h")
    assert r.returncode == 0
    assert "Usage: bbsmooth certify [OPTIONS] IMAGE..." in r.stdout
    assert "<list[Path]>" not in r.stdout and "{images}" not in r.stdout
    assert "TorchServe" in r.stdout and "Hugging Face" in r.stdout  # -e names every shape
    assert "--endpoint-id" in r.stdout
    assert "Usage: bbsmooth plot [OPTIONS] RUN..." in run_cli("plot", "-h").stdout


def test_shell_completion_completes_commands_and_options(monkeypatch):
    env = {"_BBSMOOTH_COMPLETE": "complete_bash", "COMP_WORDS": "bbsmooth cer", "COMP_CWORD": "1"}
    assert run_cli(env=env).stdout.split() == ["certify"]
    env |= {"COMP_WORDS": "bbsmooth certify --sig", "COMP_CWORD": "2"}
    assert run_cli(env=env).stdout.split() == ["--sigma"]
    # --show-completion finds the user's shell among this process's parents; under pytest
    # there may be none (CI, a background job): say it is bash
    import shellingham

    monkeypatch.setattr(shellingham, "detect_shell", lambda *a, **k: ("bash", "/bin/bash"))
    shown = run_cli("--show-completion")
    script = shown.stdout
    assert "_bbsmooth_completion" in script and "complete" in script, (
        shown.returncode,
        shown.stderr,
    )


def test_sigma_above_one_warns_with_the_value_on_the_0_1_scale(tmp_path, digit_images):
    model = write_linear(tmp_path / "m.py", np.ones(784), -300.0)
    r = run_cli("predict", digit_images[0], "-e", model, "--sigma", "25", "--n", "10",
                "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "warning: --sigma 25 is on the [0,1] pixel scale" in r.stderr
    assert "--sigma 0.09804" in r.stderr
    quiet = run_cli("predict", digit_images[0], "-e", model, "--sigma", "0.5", "--n", "10",
                    "--no-cache")  # fmt: skip
    assert "warning" not in quiet.stderr


def test_cache_info_and_clear(tmp_path, digit_images):
    model = write_linear(tmp_path / "m.py", np.ones(784), -300.0)
    cache = tmp_path / "cache"
    assert "no cache yet" in run_cli("cache", "info", "--cache", cache).stdout
    assert not cache.exists()  # looking creates nothing
    certify = ["certify", digit_images[0], "-e", model, "--sigma", "0.5", "--n0", "10", "--n",
               "100", "--cache", cache]  # fmt: skip
    assert _sent(run_cli(*certify).stdout) == 110
    info = json.loads(run_cli("cache", "info", "--cache", cache, "--json").stdout)
    assert info["exists"] and info["queries"] == 110 and info["foreign"] == 0
    assert info["bytes"] > 0 and info["directory"] == str(cache)
    (cache / "notes.txt").write_text("mine")

    refused = run_cli("cache", "clear", "--cache", cache)  # no terminal to ask: --yes needed
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert json.loads(run_cli("cache", "info", "--cache", cache, "--json").stdout)["queries"] == 110

    cleared = run_cli("cache", "clear", "--cache", cache, "--yes")
    assert cleared.returncode == 0 and "cleared 110 cached answers" in cleared.stdout
    after = json.loads(run_cli("cache", "info", "--cache", cache, "--json").stdout)
    assert after["blocks"] == after["queries"] == 0
    ledger = Path(os.environ["BBSMOOTH_LEDGER"]) / "ledger.db"  # kept apart, never cleared
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT count(*) FROM looks").fetchone()[0] == 1
    assert (cache / "notes.txt").read_text() == "mine"  # not ours: untouched
    assert _sent(run_cli(*certify).stdout) == 110  # asked again: the answers were gone
    assert "nothing to clear" in run_cli("cache", "clear", "--cache", tmp_path / "none").stdout


def test_cache_info_on_a_file_says_so(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    r = run_cli("cache", "info", "--cache", mine)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr
    assert len(messages(r.stderr)) == 1 and mine.read_text() == "mine"


def test_cache_info_defaults_to_bbsmooth_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_CACHE", str(tmp_path / "elsewhere"))
    assert str(tmp_path / "elsewhere") in run_cli("cache", "info").stdout


def _imports_after(args: list[str]) -> tuple[str, bool]:
    """Run bbsmooth's entry point with `args` in a fresh interpreter: its error line, and
    whether torch had been imported by then (the point: a fresh process's imports)."""
    code = textwrap.dedent(f"""
        import sys
        from blackbox_smooth.cli import main
        sys.argv = ["bbsmooth", *{args!r}]
        try:
            main()
        except SystemExit:
            pass
        print("torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)  # fmt: skip
    return r.stderr.strip(), r.stdout.strip() == "True"


@pytest.mark.parametrize(
    "endpoint, words",
    [
        ("htp://example.com/v2/models/m/infer", "unknown endpoint 'htp://example.com"),
        ("torch:missing.pt", "TorchScript file not found: missing.pt"),
        ("onnx:missing.onnx", "ONNX file not found: missing.onnx"),
        ("python:missing.py:f", "python endpoint file not found: missing.py"),
    ],
)
def test_bad_endpoint_fails_before_torch_loads(tmp_path, endpoint, words):
    image = tmp_path / "x.png"
    save_image(np.zeros((1, 8, 8), np.float32), image)
    error, torch_loaded = _imports_after(["certify", str(image), "-e", endpoint, "--sigma", "0.5"])
    assert words in error and error.startswith("bbsmooth: error:")
    assert not torch_loaded


def test_endpoint_id_keeps_the_cache_and_front_end_across_addresses(
    tmp_path, digits_torch, digit_images
):
    cache = tmp_path / "cache"
    image = digit_images[0]
    common = ["--sigma", "0.5", "--n0", "10", "--n", "50", "--cache", cache]
    with (
        InferenceServer(digits_torch, name="digits") as a,
        InferenceServer(digits_torch, name="digits") as b,
    ):
        assert a.url != b.url
        first = run_cli("certify", image, "-e", a.url, "--endpoint-id", "my-digits", *common)
        assert _sent(first.stdout) == 60
        moved = run_cli("certify", image, "-e", b.url, "--endpoint-id", "my-digits", *common)
        # the same model at a new address: from the cache, but for the 8 samples asked again
        assert _sent(moved.stdout) == 8 and "(8 queries): they agree" in moved.stderr
        assert _sent(run_cli("certify", image, "-e", b.url, *common).stdout) == 60

        # a front end made against A, used at B: refused, saying what differs and what to do
        data = tmp_path / "data"
        data.mkdir()
        for i, p in enumerate(digit_images):
            (data / f"{i}.png").write_bytes(p.read_bytes())
        run = tmp_path / "run"
        trained = run_cli("train", "--data", data, "--out", run, "-e", a.url, "--sigma", "0.5",
                          "--objective", "mse", "--pretrain-epochs", "1", "--cache", cache)  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "0 queries," in trained.stdout and "sent now" not in trained.stdout
        refused = run_cli("certify", image, "-e", b.url, "--frontend", run, *common)
        assert refused.returncode == 2
        assert f"url {a.url} (now {b.url})" in refused.stderr
        assert "--endpoint-id" in refused.stderr
        vouched = run_cli("certify", image, "-e", b.url, "--frontend", run, "--endpoint-id",
                          a.url, *common)  # fmt: skip
        assert vouched.returncode == 0, vouched.stderr

        # --resume with another σ names it
        again = run_cli("train", "--data", data, "--out", run, "-e", a.url, "--sigma", "0.25",
                        "--objective", "mse", "--pretrain-epochs", "1", "--resume")  # fmt: skip
        assert again.returncode == 2 and "σ 0.5 (now 0.25)" in again.stderr

    local = run_cli("certify", image, "-e", "python:" + str(ROOT / "x.py") + ":f",
                    "--endpoint-id", "x", "--sigma", "0.5")  # fmt: skip
    assert local.returncode == 2


def test_small_messages(tmp_path, digit_images, digits_model):
    image = digit_images[0]
    model = write_linear(tmp_path / "m.py", np.ones(784), -300.0)
    dry = run_cli("certify", image, "-e", model, "--sigma", "0.5", "--dry-run")
    assert "(1 image × 10,100)" in dry.stdout
    missing = run_cli("train", "--data", tmp_path / "nothere", "--out", tmp_path / "r", "-e",
                      model, "--sigma", "0.5")  # fmt: skip
    assert "does not exist" in missing.stderr
    rgb = tmp_path / "rgb.png"
    save_image(np.random.default_rng(0).random((3, 28, 28), np.float32), rgb)
    wrong = run_cli("certify", rgb, "-e", f"torch:{digits_model}", "--sigma", "0.5", "--n", "10",
                    "--no-cache")  # fmt: skip
    assert wrong.returncode == 2 and wrong.stderr.count("RuntimeError") == 1, wrong.stderr

    target = run_cli("certify", image, "-e", model, "--sigma", "0.5", "--target-radius", "0.1",
                     "--no-cache")  # fmt: skip
    assert target.returncode == 0, target.stderr
    head, row = target.stdout.splitlines()[:2]
    assert "at r=0.1" in head and re.search(r"\b(certified|not certified)\b", row)


def test_plot_takes_an_evaluation_folder(tmp_path, digits_60):
    model = write_linear(tmp_path / "m.py", np.ones(784), -300.0)
    out = tmp_path / "eval"
    r = run_cli("evaluate", "--data", digits_60, "--limit", "3", "--out", out, "-e", model,
                "--sigma", "0.5", "--n0", "10", "--n", "50", "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    plotted = run_cli("plot", out, "--out", tmp_path / "p.png")
    assert plotted.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_cli("plot", empty, "--out", tmp_path / "q.png")
    assert refused.returncode == 2 and "without a certify.tsv" in refused.stderr


def test_progress_lines_in_a_log():
    err = io.StringIO()
    with redirect_stderr(err), progress_lines("work", 10, "q", every=0.0) as advance:
        advance(4)
        advance(6)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("  work: 4/10 q (40%)") and lines[-1].startswith("  work: 10/10 q")
    quiet = io.StringIO()
    with redirect_stderr(quiet), progress_lines("work", None, "q", every=3600) as advance:
        advance(5)
    assert quiet.getvalue() == ""  # a step shorter than the interval says nothing


def test_a_step_that_does_not_advance_still_speaks_and_only_the_innermost_does():
    """One forward pass at a large size can outlast the interval: the line comes anyway."""
    err = io.StringIO()
    with redirect_stderr(err), progress_lines("run", 10, "q", every=0.2) as outer:
        with progress_lines("pre-train", 3, "batch", every=0.2):
            time.sleep(1.1)  # one long step, no advance
        outer(1)
    lines = err.getvalue().splitlines()
    inner = [line for line in lines if line.startswith("  pre-train: 0/3 batch")]
    assert len(inner) >= 3, lines
    assert not any(line.startswith("  run:") for line in lines[: len(inner)]), lines


@pytest.mark.process
def test_certify_prints_each_row_as_its_image_finishes(tmp_path, digit_images):
    """The second image's answers wait until the first image's row has reached stdout."""
    gate = tmp_path / "gate"
    (tmp_path / "m.py").write_text(
        textwrap.dedent(f"""
        import os, time
        import numpy as np
        def f(x):
            if x.mean() > 0.6:  # the white image waits for the gate
                while not os.path.exists({str(gate)!r}):
                    time.sleep(0.05)
            return np.zeros(len(x), dtype=np.int64)
    """)
    )
    white = tmp_path / "white.png"
    save_image(np.ones((1, 28, 28), np.float32), white)
    args = [sys.executable, "-m", "blackbox_smooth", "certify", str(digit_images[0]), str(white),
            "-e", f"python:{tmp_path / 'm.py'}:f", "--sigma", "0.1", "--n0", "10", "--n", "20",
            "--no-cache"]  # fmt: skip
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=ROOT) as proc:  # fmt: skip
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        head = proc.stdout.readline()
        first = proc.stdout.readline()
        assert head.startswith("image") and first.startswith(digit_images[0].name), (head, first)
        assert proc.poll() is None and time.monotonic() < deadline  # still waiting on the gate
        gate.write_text("go")
        rest, _ = proc.communicate(timeout=60)
    assert rest.splitlines()[0].startswith("white.png") and proc.returncode == 0
    assert Path(white).exists()


def test_cached_answers_of_another_model_under_the_same_endpoint_id_are_refused(
    tmp_path, digits_torch, digit_images
):
    """The model behind an address changed (or --endpoint-id names another): the canary, a
    few cached samples asked again, disagrees, and the run stops in one line before replaying."""
    (tmp_path / "other.py").write_text(
        "import numpy as np\ndef f(x):\n    return (np.arange(len(x)) % 10).astype(np.int64)\n"
    )
    other = open_blackbox(f"python:{tmp_path / 'other.py'}:f")
    cache = tmp_path / "cache"
    common = ["--sigma", "0.5", "--n0", "10", "--n", "50", "--cache", cache]
    with (
        InferenceServer(digits_torch, name="digits") as a,
        InferenceServer(other, name="digits") as b,
    ):
        first = run_cli("certify", digit_images[0], "-e", a.url, "--endpoint-id", "my", *common)
        assert first.returncode == 0 and _sent(first.stdout) == 60
        changed = run_cli("certify", digit_images[0], "-e", b.url, "--endpoint-id", "my", *common)
        assert changed.returncode == 2 and changed.stdout.count("\n") <= 1
        lines = messages(changed.stderr)
        assert len(lines) == 1 and "cached samples differently" in lines[0]
        assert "--no-cache" in lines[0] and b.images == 8  # the canary alone was sent
        fresh = run_cli("certify", digit_images[0], "-e", b.url, "--endpoint-id", "my",
                        *common[:-2], "--no-cache")  # fmt: skip
        assert fresh.returncode == 0 and _sent(fresh.stdout) == 60
