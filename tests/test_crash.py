"""Crashes: `kill -9` of certify, evaluate and train at random moments (seeded), then the same
command again until it finishes. The final result equals an uninterrupted run's; no request
answered before a kill is sent again (only those in flight at the kill can be); every cache entry
and checkpoint left behind reads back whole."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.cache import decode
from blackbox_smooth.evaluate import read_tsv
from blackbox_smooth.frontends import from_pretrained
from blackbox_smooth.serve import InferenceServer

from .conftest import ROOT, run_cli, write_digits_folder

KILLS = 2  # per command in the suite; benchmarks/crash_kill.py kills many more times
CONCURRENCY = 4


@pytest.fixture(scope="module")
def model(digits_model):
    return TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("crashdata"), 60)


def kill_then_finish(args: list, kills: int, rng: np.random.Generator, span: float):
    """Start `bbsmooth ARGS`, SIGKILL it after a random delay, `kills` times; then run it to
    the end. Returns the finishing run and the number of kills that landed."""
    landed = 0
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "blackbox_smooth", *map(str, args)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0.3, span))
        if proc.poll() is None:
            proc.kill()
            landed += 1
        proc.wait()
    return run_cli(*args), landed


def resent(server: InferenceServer) -> int:
    """Requests answered more than once."""
    return sum(count - 1 for count in server.answered.values())


def assert_cache_whole(cache: Path) -> None:
    with diskcache.Cache(str(cache)) as store:
        entries = list(store.iterkeys())
        assert entries and all(decode(store[key]) is not None for key in entries)


def crash_and_compare(model, args, cache: Path, seed: int, result):
    """`args(out)` (a command line after `bbsmooth`) run clean, then killed at random and
    finished; `result(out, completed)` of both compared."""

    def line(url: str, out: Path) -> list:
        command, *rest = args(out)
        return [command, "-e", url, *rest]

    with InferenceServer(model, name="digits", delay=0.05) as clean:
        start = time.monotonic()
        done = run_cli(*line(clean.url, cache.parent / "clean"), "--no-cache")
        assert done.returncode == 0, done.stderr
        span = 0.8 * (time.monotonic() - start)
        expected = result(cache.parent / "clean", done)
    with InferenceServer(model, name="digits", delay=0.05) as server:
        crashed = [*line(server.url, cache.parent / "crashed"), "--cache", cache]
        final, landed = kill_then_finish(crashed, KILLS, np.random.default_rng(seed), span)
        assert final.returncode == 0, final.stderr
        assert landed >= 1
        assert resent(server) <= landed * CONCURRENCY  # only requests in flight at a kill
    assert result(cache.parent / "crashed", final) == expected
    assert_cache_whole(cache)


def test_certify_killed_at_random_finishes_with_the_same_certificate(model, digit_images, tmp_path):
    def args(_: Path) -> list:
        return ["certify", digit_images[2], "--sigma", "0.25", "--n", "4000", "--batch", "50",
                "--concurrency", CONCURRENCY, "--json"]  # fmt: skip

    def result(_: Path, done) -> tuple:
        cert = json.loads(done.stdout)
        return cert["label"], cert["radius"], cert["counts"]

    crash_and_compare(model, args, tmp_path / "cache", 1, result)


def test_evaluate_killed_at_random_finishes_with_the_same_report(model, folder, tmp_path):
    def args(out: Path) -> list:
        return ["evaluate", "--data", folder, "--sigma", "0.25", "--n0", "50", "--n", "500",
                "--every", "10", "--out", out, "--batch", "50",
                "--concurrency", CONCURRENCY]  # fmt: skip

    def result(out: Path, _) -> list:
        assert not list(out.glob(".*"))  # no temporary file left behind
        rows = read_tsv(out / "certify.tsv")
        return [(r.idx, r.label, r.predict, r.radius, r.correct, r.queries) for r in rows]

    crash_and_compare(model, args, tmp_path / "cache", 2, result)


def test_train_killed_at_random_resumes_to_the_same_checkpoint(model, folder, tmp_path):
    def args(out: Path) -> list:
        return ["train", "--data", folder, "--sigma", "0.5", "--out", out, "--epochs", "3",
                "--max-queries", "1500", "--pretrain-epochs", "1", "--resume", "--batch", "50",
                "--concurrency", CONCURRENCY]  # fmt: skip

    def result(run: Path, _) -> tuple:
        from_pretrained(run, torch.device("cpu"))  # loads whole
        assert not list(run.parent.glob(f".{run.name}.*"))  # no half-swapped folder left
        config = json.loads((run / "config.json").read_text())
        curve = [{k: v for k, v in e.items() if k != "seconds"} for e in config["validation"]]
        return (run / "frontend.safetensors").read_bytes(), curve

    crash_and_compare(model, args, tmp_path / "cache", 3, result)
