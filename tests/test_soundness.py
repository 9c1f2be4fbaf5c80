"""Soundness at the edges: evidence reused by a second protocol is flagged, σ must be finite,
a bound of exactly 1/2 abstains, out-of-range labels are refused, and contradictory options are
refused. The CLI runs in-process here."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from blackbox_smooth import stats
from blackbox_smooth.cli import main
from blackbox_smooth.data import save_image

from .conftest import write_linear
from .harness import cache_rows

W = np.array([0.8, -1.1, 0.4, 0.9, -0.3, 0.6, 0.2, -0.7, 0.5])


def invoke(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`bbsmooth ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["bbsmooth", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def setup(tmp_path):
    image = tmp_path / "x.png"
    save_image(np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(1, 3, 3), image)
    endpoint = write_linear(tmp_path / "linear.py", W, 0.2)
    common = [image, "-e", endpoint, "--sigma", "0.5", "--cache", tmp_path / "cache", "--json"]
    return common, tmp_path


def test_a_second_protocol_on_the_same_samples_is_not_fresh(monkeypatch, capsys, setup):
    common, _ = setup
    runs = {}
    for name, extra in [("n1000", ["--n", "1000"]), ("n2000", ["--n", "2000"]),
                        ("n1000 again", ["--n", "1000"])]:  # fmt: skip
        code, out, err = invoke(monkeypatch, capsys, "certify", *common, *extra)
        assert code == 0, err
        runs[name] = (json.loads(out), err)
    assert runs["n1000"][0]["fresh"] is True and runs["n1000"][1] == ""
    second, warning = runs["n2000"]
    assert second["fresh"] is False and second["reused"].startswith("fixed n=1000, n0=100")
    assert warning.count("\n") == 1 and "warning" in warning and "--target-radius" in warning
    assert "fixed n=1000" in warning
    again, warned = runs["n1000 again"]
    # a reproduction of the first, after another attempt was made: weighed against it
    assert again["fresh"] is False and again["looks"] == 2 and "not fresh" in warned
    assert again["counts"] == runs["n1000"][0]["counts"] and again["queries_sent"] == 0


def test_a_fixed_run_after_an_adaptive_one_is_not_fresh(monkeypatch, capsys, setup):
    common, _ = setup
    code, out, err = invoke(monkeypatch, capsys, "certify", *common, "--target-radius", "0.1",
                            "--n", "20000")  # fmt: skip
    assert code == 0 and json.loads(out)["fresh"] is True, err
    code, out, err = invoke(monkeypatch, capsys, "certify", *common, "--n", "20000")
    assert code == 0 and json.loads(out)["fresh"] is False
    assert "--target-radius 0.1" in json.loads(out)["reused"] and "warning" in err


@pytest.mark.parametrize("sigma", ["inf", "-inf", "nan", "0", "-1"])
def test_sigma_must_be_finite_and_positive(monkeypatch, capsys, setup, sigma):
    common, _ = setup
    args = [a if a != "0.5" else sigma for a in common]
    code, out, err = invoke(monkeypatch, capsys, "certify", *args)
    assert code == 2 and err.count("\n") == 1 and "finite number > 0" in err and out == ""


def test_a_lower_bound_of_exactly_one_half_abstains(monkeypatch):
    monkeypatch.setattr(stats, "lower_confidence_bound", lambda k, n, a: 0.5)
    assert stats.certify({3: 10}, {3: 600}, 1000, 0.001, 0.5).abstain
    monkeypatch.setattr(stats, "lower_confidence_bound", lambda k, n, a: 0.5000001)
    assert stats.certify({3: 10}, {3: 600}, 1000, 0.001, 0.5).label == 3


@pytest.mark.parametrize(("extra", "says"), [
    (["--budget", "500", "--target-radius", "0.2"], "pick one"),
    (["--budget", "500", "--n", "300"], "drop --n"),
])  # fmt: skip
def test_contradictory_options_are_refused(monkeypatch, capsys, setup, extra, says):
    common, tmp = setup
    code, _, err = invoke(monkeypatch, capsys, "certify", *common, *extra)
    assert code == 2 and err.count("\n") == 1 and says in err
    assert not (tmp / "cache").exists()


def test_labels_beyond_the_class_range_are_refused_never_truncated(monkeypatch, capsys, setup):
    common, tmp = setup
    (tmp / "big.py").write_text(
        "import numpy as np\ndef f(x):\n    return np.full(len(x), 2**32 + 3, dtype=np.int64)\n"
    )
    args = [a if not str(a).startswith("python:") else f"python:{tmp / 'big.py'}:f" for a in common]
    code, _, err = invoke(monkeypatch, capsys, "certify", *args, "--n", "100")
    assert code in (2, 3) and err.count("\n") == 1 and "out of range" in err
    assert cache_rows(tmp / "cache") == {}  # nothing stored that could replay as class 3


def test_the_confidence_sequence_is_chosen_with_bound_and_only_for_adaptive_runs(
    monkeypatch, capsys, setup
):
    common, _ = setup
    code, out, err = invoke(monkeypatch, capsys, "certify", *common, "--target-radius", "0.1",
                            "--bound", "cs")  # fmt: skip
    cert = json.loads(out)
    assert code == 0 and cert["bound"] == "cs" and cert["mode"] == "target", err
    code, _, err = invoke(monkeypatch, capsys, "certify", *common, "--bound", "cs")
    assert code == 2 and "--target-radius" in err
    code, _, err = invoke(monkeypatch, capsys, "certify", *common, "--budget", "900",
                          "--bound", "nope")  # fmt: skip
    assert code == 2 and "'--bound'" in err and "'union', 'cs'" in err
