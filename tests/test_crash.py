"""Crashes: `kill -9` of certify, evaluate and train at random moments (seeded), then the same
command again until it finishes. The final result equals an uninterrupted run's; no request
answered before a kill is sent again (only those in flight at the kill can be, and the canary's
8 cached samples that each restart asks again); every cache entry
and checkpoint left behind reads back whole."""

from __future__ import annotations

import pytest

from .harness import CONCURRENCY, certify_case, crash_and_compare, evaluate_case, train_case

pytestmark = pytest.mark.process  # every test here starts a process of its own

KILLS = 2  # per command in the suite; benchmarks/crash_kill.py kills many more times


def check(crashes) -> None:
    assert crashes.kills >= 1 and crashes.same
    # only requests in flight at a kill, and each restart's canary (one request: 8 cached
    # samples asked again before the cache is replayed, the same 8 at every restart)
    assert crashes.resent <= crashes.kills * (CONCURRENCY + 1)
    assert crashes.entries > 0 and crashes.damaged == 0


def test_certify_killed_at_random_finishes_with_the_same_certificate(
    digits_torch, digit_images, tmp_path
):
    check(crash_and_compare(digits_torch, certify_case(digit_images[2]), tmp_path, KILLS, seed=1))


def test_evaluate_killed_at_random_finishes_with_the_same_report(digits_torch, digits_60, tmp_path):
    check(crash_and_compare(digits_torch, evaluate_case(digits_60), tmp_path, KILLS, seed=2))


def test_train_killed_at_random_resumes_to_the_same_checkpoint(digits_torch, digits_60, tmp_path):
    check(crash_and_compare(digits_torch, train_case(digits_60), tmp_path, KILLS, seed=3))
