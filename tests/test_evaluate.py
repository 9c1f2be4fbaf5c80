"""`bbsmooth evaluate` and `bbsmooth plot`: Cohen et al.'s TSV, summary.json, the plot, subsets,
resume from the cache, dry runs and costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.errors import UsageError
from blackbox_smooth.evaluate import certified_accuracy, load_dataset, read_tsv, select
from blackbox_smooth.options import DatasetOptions

from .conftest import run_cli, write_digits_folder

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("evaldata"), 12)


def test_evaluate_writes_cohens_tsv_summary_and_plot_then_resumes_from_cache(
    digits_model, digits_folder, tmp_path
):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["evaluate", "--data", digits_folder, "-e", f"torch:{digits_model}", "--sigma", "0.25",
            "--n0", "50", "--n", "500", "--out", out, "--cache", cache, "--skip", "1",
            "--every", "2", "--limit", "5", "--price-per-1000", "2.0"]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    lines = (out / "certify.tsv").read_text().splitlines()
    assert lines[0].split("\t") == [
        "idx", "label", "predict", "radius", "correct", "time", "queries", "sent", "fresh",
    ]  # fmt: skip
    rows = read_tsv(out / "certify.tsv")
    assert [r.idx for r in rows] == [1, 3, 5, 7, 9]
    assert all(r.queries == r.sent == 550 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["queries_sent"] == 5 * 550
    assert summary["cost"] == pytest.approx(5 * 550 / 1000 * 2.0)
    assert summary["certified_accuracy"]["0.00"] == summary["clean_accuracy"]
    assert summary["certified_accuracy"]["0.00"] == pytest.approx(
        np.mean([r.correct for r in rows])
    )
    acr = sum(r.radius for r in rows if r.correct) / 5
    assert summary["average_certified_radius"] == pytest.approx(acr, abs=1e-4)  # TSV: 4 places
    assert (out / "certified_accuracy.png").read_bytes().startswith(PNG)
    assert "(cost 5.50)" in first.stdout
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "summary.json").read_text())["queries_sent"] == 0
    assert json.loads((out / "summary.json").read_text())["not_fresh"] == 0  # a replay is fresh
    assert "warning" not in again.stderr
    assert read_tsv(out / "certify.tsv") == [r.__class__(**{**r.__dict__, "time": s.time, "sent": 0})
                                             for r, s in zip(rows, read_tsv(out / "certify.tsv"), strict=True)]  # fmt: skip


@pytest.mark.slow
def test_adaptive_evaluation_spends_less_and_agrees_with_fixed_n(
    digits_model, digits_folder, tmp_path
):
    common = ["--data", digits_folder, "-e", f"torch:{digits_model}", "--sigma", "0.25",
              "--n", "8000", "--no-cache"]  # fmt: skip
    fixed = run_cli("evaluate", *common, "--out", tmp_path / "fixed")
    adaptive = run_cli("evaluate", *common, "--out", tmp_path / "ad", "--target-radius", "0.25")
    assert fixed.returncode == 0 and adaptive.returncode == 0, adaptive.stderr
    f, a = read_tsv(tmp_path / "fixed" / "certify.tsv"), read_tsv(tmp_path / "ad" / "certify.tsv")
    # an image near the target may need every vote: the total falls > 5×, the typical one > 20×
    assert sum(r.queries for r in f) / sum(r.queries for r in a) > 5
    assert np.median([r.queries for r in a]) * 20 < np.median([r.queries for r in f])
    at = certified_accuracy(f, [0.25])[0], certified_accuracy(a, [0.25])[0]
    assert abs(at[0] - at[1]) <= 1 / 12 + 1e-9
    s = json.loads((tmp_path / "ad" / "summary.json").read_text())
    assert s["mode"] == "target" and s["target_radius"] == 0.25


def test_dry_run_sends_nothing_and_prices_the_worst_case(server, digits_folder, tmp_path):
    out = tmp_path / "out"
    done = run_cli("evaluate", "--data", digits_folder, "-e", server.url, "--sigma", "0.5",
                   "--out", out, "--dry-run", "--price-per-1000", "1.5", "--n", "1000")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "at most 13,200 queries (12 images × 1,100)" in done.stdout
    assert "(cost 19.80)" in done.stdout
    assert server.requests == 0 and not out.exists()
    budget = run_cli("certify", *sorted(digits_folder.rglob("*.png"))[:2], "-e", server.url,
                     "--sigma", "0.5", "--budget", "800", "--dry-run")  # fmt: skip
    assert "at most 1,600 queries (2 images × 800)" in budget.stdout and server.requests == 0


def test_plot_overlays_runs_with_a_legend(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.2)):
        d = tmp_path / name
        d.mkdir()
        rows = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]  # Cohen et al.'s own columns
        rows += [f"{i}\t1\t1\t{0.1 * i + shift:.3f}\t1\t0:00:01.5" for i in range(8)]
        (d / "certify.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"sigma": 0.25, "frontend": "fe"}))
    done = run_cli("plot", tmp_path / "a" / "certify.tsv", tmp_path / "b" / "certify.tsv",
                   "--out", tmp_path / "fig.png")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fig.png").read_bytes().startswith(PNG)
    assert read_tsv(tmp_path / "a" / "certify.tsv")[3].time == 1.5
    bad = run_cli("plot", tmp_path / "fig.png", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "bbsmooth: error:" in bad.stderr


def test_datasets_from_a_csv_with_classes_and_subsets(digits_folder, tmp_path):
    images = sorted(digits_folder.rglob("*.png"))
    csv = tmp_path / "set.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in images))
    ds = load_dataset(csv, classes=[str(k) for k in range(10)])
    assert ds.labels == [int(p.parent.name) for p in images] and len(ds.classes) == 10
    assert select(100, skip=0, every=20) == [0, 20, 40, 60, 80]
    with pytest.raises(UsageError, match="not among --classes"):
        load_dataset(digits_folder, classes=["cat", "dog"])
    with pytest.raises(UsageError, match="not found"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(UsageError, match="--every >= 1"):
        DatasetOptions(csv, every=0)
