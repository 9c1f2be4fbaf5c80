"""`bbsmooth evaluate` and `bbsmooth plot`: Cohen et al.'s TSV, summary.json, the plot, subsets,
resume from the cache, dry runs and costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.data import save_image
from blackbox_smooth.errors import UsageError
from blackbox_smooth.evaluate import certified_accuracy, load_dataset, read_tsv, select
from blackbox_smooth.options import DatasetOptions

from .conftest import messages, run_cli, write_digits_folder

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
        "looks", "alpha_effective",
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


BY_BRIGHTNESS = """
import numpy as np

def f(x):
    # each test image is one grey level: its mean (noise averages out over 64 pixels) names it
    m = x.reshape(len(x), -1).mean(axis=1)
    return np.select([m < 0.3, m < 0.5, m < 0.7], [0, 1, 2], default=10).astype(np.int64)
"""


def _grey_csv(tmp_path: Path, labels: list[str]) -> Path:
    """One 8×8 grey image per label (0.2, 0.4, 0.6, 0.8: the classes 0, 1, 2, 10 above)."""
    lines = ["path,label"]
    for i, label in enumerate(labels):
        save_image(np.full((1, 8, 8), 0.2 + 0.2 * i), tmp_path / f"g{i}.png")
        lines.append(f"g{i}.png,{label}")
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_integer_csv_labels_are_class_indices_end_to_end(tmp_path):
    csv = _grey_csv(tmp_path, ["0", "1", "2", "10"])  # sorted as text: 0, 1, 10, 2
    (tmp_path / "bb.py").write_text(BY_BRIGHTNESS)
    out = tmp_path / "out"
    done = run_cli("evaluate", "--data", csv, "-e", f"python:{tmp_path / 'bb.py'}:f",
                   "--sigma", "0.1", "--n0", "20", "--n", "200", "--out", out, "--no-cache")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = read_tsv(out / "certify.tsv")
    assert [(r.label, r.predict, r.correct) for r in rows] == [
        (0, 0, 1), (1, 1, 1), (2, 2, 1), (10, 10, 1),
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clean_accuracy"] == 1.0
    assert summary["classes"] == [str(k) for k in range(11)]  # class k is classes[k]


def test_mixed_csv_labels_are_refused_in_one_line_unless_classes_map_them(tmp_path):
    csv = _grey_csv(tmp_path, ["0", "cat", "dog", "1"])
    (tmp_path / "bb.py").write_text(BY_BRIGHTNESS)
    common = ["evaluate", "--data", csv, "-e", f"python:{tmp_path / 'bb.py'}:f",
              "--sigma", "0.1", "--n0", "20", "--n", "200", "--no-cache"]  # fmt: skip
    refused = run_cli(*common, "--out", tmp_path / "refused")
    assert refused.returncode == 2
    assert messages(refused.stderr) == [
        f"bbsmooth: error: --data {csv} mixes class indices ('0') and class names ('cat'): "
        "give --classes NAME,… in index order"
    ]
    assert not (tmp_path / "refused").exists()
    # names through --classes' order, integers as indices into it
    done = run_cli(*common, "--out", tmp_path / "out", "--classes", "zero,one,cat,dog")
    assert done.returncode == 0, done.stderr
    rows = read_tsv(tmp_path / "out" / "certify.tsv")
    assert [r.label for r in rows] == [0, 2, 3, 1]
    assert [r.predict for r in rows] == [0, 1, 2, 10] and [r.correct for r in rows] == [1, 0, 0, 0]


def test_csv_labels_without_classes_names_sorted_and_indices_in_range(tmp_path):
    names = load_dataset(_grey_csv(tmp_path, ["dog", "cat", "dog"]))
    assert names.labels == [1, 0, 1] and names.classes == ["cat", "dog"]
    assert load_dataset(_grey_csv(tmp_path, ["07", "3"])).labels == [7, 3]
    with pytest.raises(UsageError, match=r"class index 100,000: indices run 0..99,999"):
        load_dataset(_grey_csv(tmp_path, ["1", "100000"]))
