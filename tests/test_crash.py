"""Crashes: `kill -9` of certify, evaluate and train at random moments (seeded), then the same
command again until it finishes. The final result equals an uninterrupted run's; no request
answered before a kill is sent again (only those in flight at the kill can be); every cache entry
and checkpoint left behind reads back whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blackbox_smooth.adapters import TorchModel

from .conftest import write_digits_folder
from .harness import CONCURRENCY, certify_case, crash_and_compare, evaluate_case, train_case

KILLS = 2  # per command in the suite; benchmarks/crash_kill.py kills many more times


@pytest.fixture(scope="module")
def model(digits_model):
    return TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("crashdata"), 60)


def check(crashes) -> None:
    assert crashes.kills >= 1 and crashes.same
    assert crashes.resent <= crashes.kills * CONCURRENCY  # only requests in flight at a kill
    assert crashes.entries > 0 and crashes.damaged == 0


def test_certify_killed_at_random_finishes_with_the_same_certificate(model, digit_images, tmp_path):
    check(crash_and_compare(model, certify_case(digit_images[2]), tmp_path, KILLS, seed=1))


def test_evaluate_killed_at_random_finishes_with_the_same_report(model, folder, tmp_path):
    check(crash_and_compare(model, evaluate_case(folder), tmp_path, KILLS, seed=2))


def test_train_killed_at_random_resumes_to_the_same_checkpoint(model, folder, tmp_path):
    check(crash_and_compare(model, train_case(folder), tmp_path, KILLS, seed=3))
