"""A user's own model at its own size (3×224×224 ONNX, ImageNet convention), run as a user runs
it, in a process of its own: `train` is never silent for 10 s in any phase (its output read
from a pipe, as a log reads it), and certify, evaluate and train stay under 1.5 GB of peak
memory; a smaller --max-memory holds less."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import listen
from .pagemodel import make_page_model

pytestmark = pytest.mark.process  # every test here starts a process of its own

CAP_MIB = 1536  # the goal: 1.5 GB for certify, evaluate and train at 320×320 and below


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pages")
    make_page_model(folder, 224, train=40, test=4)
    return folder


def _endpoint(pages: Path) -> list[str]:
    return ["-e", f"onnx:{pages / 'model.onnx'}", "--preset", "imagenet", "--sigma", "0.25"]


def test_train_at_224_speaks_in_every_phase_and_stays_under_the_cap(pages, tmp_path):
    heard = listen(["train", "--data", pages / "train", "--out", tmp_path / "run",
                    *_endpoint(pages), "--pretrain-epochs", "1", "--epochs", "1",
                    "--max-queries", "200", "--val-fraction", "0.25", "--val-draws", "2",
                    "--confirm-draws", "0", "--no-cache", "--force"])  # fmt: skip
    assert heard.returncode == 0, heard.output[-3000:]
    assert heard.longest_silence < 10, (heard.longest_silence, heard.after)
    assert heard.peak_rss_mib < CAP_MIB, heard.peak_rss_mib
    assert "pre-training the denoiser" in heard.output and "certify with:" in heard.output


def test_certify_and_evaluate_at_224_stay_under_the_cap_and_follow_max_memory(pages, tmp_path):
    image = next((pages / "test").rglob("*.png"))
    peaks = {}
    for budget in ("1G", "256M"):
        certify = listen(["certify", image, *_endpoint(pages), "--n", "2000", "--no-cache",
                          "--max-memory", budget])  # fmt: skip
        assert certify.returncode == 0, certify.output[-2000:]
        peaks[budget] = certify.peak_rss_mib
    assert peaks["1G"] < CAP_MIB and peaks["256M"] < peaks["1G"] - 100, peaks
    evaluate = listen(["evaluate", "--data", pages / "test", *_endpoint(pages), "--n", "500",
                       "--no-cache", "--out", tmp_path / "eval"])  # fmt: skip
    assert evaluate.returncode == 0, evaluate.output[-2000:]
    assert evaluate.peak_rss_mib < CAP_MIB, evaluate.peak_rss_mib
