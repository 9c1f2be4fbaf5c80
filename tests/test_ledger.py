"""The evidence ledger cannot be sidestepped: every way of looking at an image twice under one
model (another n, seed, σ in the tenth decimal, spelling of the model file, cache, a predict
first, a run cut short) gives `fresh: false` with the right `looks` and `alpha_effective`; a
different model and the first look stay fresh. The CLI runs in-process."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.data import save_image
from blackbox_smooth.ledger import DATABASE

from .conftest import ROOT, run_cli, write_linear

W = np.array([0.8, -1.1, 0.4, 0.9, -0.3, 0.6, 0.2, -0.7, 0.5])
ALPHA = 0.001


@pytest.fixture()
def setup(tmp_path):
    image = tmp_path / "x.png"
    save_image(np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(1, 3, 3), image)
    endpoint = write_linear(tmp_path / "linear.py", W, 0.2)
    return image, endpoint, tmp_path


def certify(image, endpoint, *extra, command="certify"):
    """One run's JSON line (exit code checked)."""
    done = run_cli(command, image, "-e", endpoint, "--sigma", "0.5", "--json", *map(str, extra))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def assert_look(result, looks, claim=None):
    """`looks` attempts recorded; `claim`, the α the result holds at, by default α for the
    only look and none (1) for a later one on the same seed, whose votes were seen before."""
    assert result["fresh"] is (looks == 1)
    assert result["looks"] == looks
    expected = claim if claim is not None else ALPHA if looks == 1 else 1.0
    assert math.isclose(result["alpha_effective"], expected)


def test_the_first_look_is_fresh_and_a_replay_stays_fresh(setup):
    image, endpoint, _ = setup
    first, quiet = certify(image, endpoint, "--n", "1000")
    assert_look(first, 1)
    assert quiet == "" and first["reused"] is None
    again, quiet = certify(image, endpoint, "--n", "1000")
    assert_look(again, 1)
    assert quiet == "" and again["counts"] == first["counts"]


def test_another_n_without_any_cache_is_not_fresh(setup):
    """A python: endpoint is not cached by default: the ledger records the look anyway."""
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000")
    second, warning = certify(image, endpoint, "--n", "2000")
    assert_look(second, 2)
    assert second["reused"].startswith("fixed n=1000, n0=100, α=0.001, seed 0: label")
    lines = warning.splitlines()
    assert len(lines) == 1 and "not fresh: look 2" in lines[0] and "makes no claim" in lines[0]
    third, _ = certify(image, endpoint, "--n", "3000")
    assert_look(third, 3)
    replay_of_second, _ = certify(image, endpoint, "--n", "2000")
    assert_look(replay_of_second, 3)  # a replay is weighed against every attempt made since
    first_again, _ = certify(image, endpoint, "--n", "1000")
    assert_look(first_again, 3)  # not fresh any more: two other attempts were made


def test_the_same_model_file_named_another_way_is_the_same_model(setup, tmp_path):
    image, endpoint, _ = setup
    path = tmp_path / "linear.py"
    (tmp_path / "dir").mkdir()
    (tmp_path / "link.py").symlink_to(path)
    certify(image, endpoint, "--n", "1000")
    spellings = [
        f"python:{tmp_path}/dir/../linear.py:f",
        f"python:{tmp_path}/./linear.py:f",
        f"python:{tmp_path / 'link.py'}:f",
        f"python:{os.path.relpath(path, ROOT)}:f",  # the CLI runs in the project's root
    ]
    for looks, spelled in enumerate(spellings, start=2):
        result, _ = certify(image, spelled, "--n", str(1000 + looks))
        assert_look(result, looks)


def test_a_copy_of_the_model_file_is_the_same_model_another_model_is_fresh(setup, tmp_path):
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000")
    copy = tmp_path / "copy.py"
    copy.write_bytes((tmp_path / "linear.py").read_bytes())
    result, _ = certify(image, f"python:{copy}:f", "--n", "1500")
    assert_look(result, 2)
    other = write_linear(tmp_path / "other.py", W * 2, 0.1)
    result, _ = certify(image, other, "--n", "1500")
    assert_look(result, 1)  # a genuinely different model: its first look
    source = (tmp_path / "linear.py").read_text() + "\ng = f\n"
    (tmp_path / "two.py").write_text(source)
    certify(image, f"python:{tmp_path / 'two.py'}:f", "--n", "1000")
    result, _ = certify(image, f"python:{tmp_path / 'two.py'}:g", "--n", "1000")
    assert_look(result, 1)  # another function of the same file: another model


def test_another_image_is_fresh(setup, tmp_path):
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000")
    other = tmp_path / "y.png"
    save_image(np.linspace(0.9, 0.1, 9, dtype=np.float32).reshape(1, 3, 3), other)
    result, _ = certify(other, endpoint, "--n", "2000")
    assert_look(result, 1)
    renamed = tmp_path / "renamed.png"
    renamed.write_bytes(image.read_bytes())
    result, _ = certify(renamed, endpoint, "--n", "2000")
    assert_look(result, 2)  # the same content under another name


def test_sigma_changed_in_the_tenth_decimal_is_the_same_question(setup):
    image, endpoint, _ = setup
    first, _ = certify(image, endpoint, "--n", "1000")
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5000000001", "--json",
                   "--n", "1000")  # fmt: skip
    second = json.loads(done.stdout)
    assert second["counts"] == first["counts"]  # the same votes, the same protocol: a replay
    assert_look(second, 1)
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5000000001", "--json",
                   "--n", "2000")  # fmt: skip
    assert_look(json.loads(done.stdout), 2)
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.25", "--json", "--n", "1000")
    assert_look(json.loads(done.stdout), 1)  # another σ: another smoothed classifier


def test_predict_first_then_certify_is_not_fresh(setup):
    image, endpoint, _ = setup
    looked, _ = certify(image, endpoint, "--n", "1000", command="predict")
    assert_look(looked, 1)
    result, warning = certify(image, endpoint, "--n", "1000")
    assert_look(result, 2)
    assert result["reused"].startswith("predict n=1000, α=0.001, seed 0: label")
    assert "not fresh" in warning


def test_another_cache_or_no_cache_after_a_cached_look(setup, tmp_path):
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000", "--cache", tmp_path / "a")
    other, _ = certify(image, endpoint, "--n", "1200", "--cache", tmp_path / "b")
    assert_look(other, 2)
    none, _ = certify(image, endpoint, "--n", "1400", "--no-cache")
    assert_look(none, 3)


def test_a_new_seed_after_a_failed_look_is_not_fresh(setup):
    image, endpoint, _ = setup
    failed, _ = certify(image, endpoint, "--n", "1000", "--target-radius", "5")
    assert failed["radius"] < 5
    retry, _ = certify(image, endpoint, "--n", "1000", "--target-radius", "5", "--seed", "1")
    assert_look(retry, 2, claim=2 * ALPHA)  # another seed: fresh votes, a union bound
    assert "seed 0" in retry["reused"] and "--target-radius 5" in retry["reused"]


def test_a_run_stopped_by_the_budget_is_a_look(setup):
    image, endpoint, _ = setup
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--n", "5000",
                   "--max-queries", "2000")  # fmt: skip
    assert done.returncode != 0 and "--max-queries" in done.stderr
    result, _ = certify(image, endpoint, "--n", "1000")
    assert_look(result, 2)
    assert result["reused"].endswith("stopped before it finished")


def test_a_run_cut_short_by_ctrl_c_or_an_error_is_a_look(setup, tmp_path):
    """Ctrl-C (a SIGINT to this process) on the model's third batch, then an error on its
    third batch of the next run: the earlier batches' votes were seen, so each attempt counts."""
    image, _, _ = setup
    calls, mode = tmp_path / "calls", tmp_path / "mode"
    source = (tmp_path / "linear.py").read_text() + (
        "\nimport os, pathlib, signal\n"
        "def cut(x):\n"
        f"    p, mode = pathlib.Path({str(calls)!r}), pathlib.Path({str(mode)!r}).read_text()\n"
        "    done = int(p.read_text())\n"
        "    p.write_text(str(done + 1))\n"
        "    if done == 2 and mode == 'interrupt':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    if done == 2 and mode == 'error':\n"
        "        raise ValueError('broken')\n"
        "    return f(x)\n"
    )
    (tmp_path / "cut.py").write_text(source)
    endpoint = f"python:{tmp_path / 'cut.py'}:cut"
    common = [image, "-e", endpoint, "--sigma", "0.5", "--batch", "100", "--n0", "100"]
    calls.write_text("0")
    mode.write_text("interrupt")
    # Ctrl-C as a user's shell delivers it (an earlier test in this process, Ray's for one,
    # may have left another SIGINT handler behind)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = run_cli("certify", *common, "--n", "1000")
    finally:
        signal.signal(signal.SIGINT, before)
    assert done.returncode == 130 and int(calls.read_text()) >= 3
    calls.write_text("0")
    mode.write_text("error")
    done = run_cli("certify", *common, "--n", "1100")
    assert done.returncode == 2 and "ValueError" in done.stderr
    mode.write_text("answer")
    result, _ = certify(image, endpoint, "--batch", "100", "--n", "1200")
    assert_look(result, 3)


def test_cache_clear_keeps_the_ledger_and_it_lives_where_the_environment_says(setup, tmp_path):
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000", "--cache", tmp_path / "c")
    done = run_cli("cache", "clear", "--cache", tmp_path / "c", "--yes")
    assert done.returncode == 0, done.stderr
    result, _ = certify(image, endpoint, "--n", "1000", "--cache", tmp_path / "c")
    assert_look(result, 1)  # the replay stays fresh, its answers asked again
    result, _ = certify(image, endpoint, "--n", "2000", "--cache", tmp_path / "c")
    assert_look(result, 2)
    ledger = Path(os.environ["BBSMOOTH_LEDGER"]) / DATABASE  # set by tests/conftest.py
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT count(*) FROM looks").fetchone()[0] == 2
    moved = tmp_path / "moved"
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--json", "--n", "2000",
                   env={"BBSMOOTH_LEDGER": moved})  # fmt: skip
    assert json.loads(done.stdout)["fresh"] is True and (moved / DATABASE).is_file()


def test_an_unwritable_ledger_is_one_line(setup, tmp_path):
    image, endpoint, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--n", "100",
                   env={"BBSMOOTH_LEDGER": blocker})  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "BBSMOOTH_LEDGER" in lines[0]
    assert blocker.read_text() == "not a folder"


def test_the_table_and_the_tsv_say_which_look(setup, tmp_path):
    image, endpoint, _ = setup
    certify(image, endpoint, "--n", "1000")
    done = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--n", "2000")
    assert "evidence" in done.stdout.splitlines()[0]
    assert "look 2, no claim" in done.stdout
    data = tmp_path / "data"
    (data / "1").mkdir(parents=True)
    (data / "1" / "x.png").write_bytes(image.read_bytes())
    out = tmp_path / "eval"
    done = run_cli("evaluate", "-e", endpoint, "--data", data, "--sigma", "0.5", "--n", "3000",
                   "--out", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    head, row = (out / "certify.tsv").read_text().splitlines()
    values = dict(zip(head.split("\t"), row.split("\t"), strict=True))
    assert (values["fresh"], values["looks"], values["alpha_effective"]) == ("0", "3", "1")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["not_fresh"] == 1 and summary["alpha_effective_max"] == 1.0


def test_another_spelling_of_the_endpoint_url_is_the_same_model(setup, tmp_path):
    """Case, percent-escapes and the name of this machine do not make a second
    look a first."""
    from blackbox_smooth.adapters import open_blackbox
    from blackbox_smooth.serve import InferenceServer

    image, endpoint, _ = setup
    with InferenceServer(open_blackbox(endpoint), name="linear") as server:  # type: ignore[arg-type]
        port = server.port
        first, _ = certify(image, server.url, "--n", "1000", "--no-cache")
        assert_look(first, 1)
        spellings = [
            f"http://LOCALHOST:{port}/v2/models/linear/infer",
            f"http://127.0.0.1:{port}/v2/models/%6Cinear/infer",
        ]
        for looks, spelled in enumerate(spellings, start=2):
            result, _ = certify(
                image, spelled, "--n", str(1000 + looks), "--no-cache", "--protocol", "kserve"
            )
            assert_look(result, looks)
