"""Adaptive (anytime-valid) certification: wrong certificates stay below α whatever look it
stops at, easy inputs stop far earlier than n, and the budget is never crossed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from blackbox_smooth import stats
from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.smooth import Smoothed

from .conftest import write_linear

W = np.array([0.8, -1.1, 0.4, 0.9, -0.3, 0.6, 0.2, -0.7, 0.5])
SIGMA = 0.5


def true_radius(x: np.ndarray, b: float) -> float:
    return abs(W @ x.ravel() + b) / np.linalg.norm(W)


def simulate(p_a: float, n: int, alpha: float, p_target: float, valid: bool, rng) -> float:
    """One adaptive run on Bernoulli(p_a) votes; returns the reported lower bound. `valid`:
    each look at α/K (ours); otherwise the fixed-n bound at α at every look (the mistake)."""
    schedule = stats.looks(n, first=100)
    level = alpha / len(schedule) if valid else alpha
    votes = rng.random(n) < p_a
    for m in schedule:
        k = int(votes[:m].sum())
        if stats.decided(k, m, level, p_target):
            break
    return stats.lower_confidence_bound(k, m, level)


def test_union_bound_keeps_wrong_certificates_below_alpha_and_naive_looks_do_not():
    """pA just below the target: a certificate at the target is wrong. Re-using the fixed-n
    bound at each look is wrong far more often than α; the union bound is not (this is what
    makes the test able to fail)."""
    rng = np.random.default_rng(0)
    alpha, n, trials = 0.05, 12_800, 4000
    p_target = 0.9
    p_a = 0.897
    wrong = {True: 0, False: 0}
    for valid in (True, False):
        for _ in range(trials):
            wrong[valid] += simulate(p_a, n, alpha, p_target, valid, rng) > p_a
    margin = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert wrong[True] / trials <= alpha + margin
    assert wrong[False] / trials > alpha + margin  # the naive procedure breaks the guarantee


def test_adaptive_certificates_on_a_linear_classifier_stay_within_alpha(tmp_path):
    """End to end through Smoothed: over many seeds, P[certified radius > true radius] ≤ α
    (+ Monte Carlo margin), with the target set right at the true radius."""
    spec = write_linear(tmp_path / "lin.py", W, 0.0)
    x = np.full((1, 3, 3), 0.35, np.float32)
    truth = true_radius(x, 0.0)
    smoothed = Smoothed(open_blackbox(spec), sigma=SIGMA, device="cpu")
    alpha, trials = 0.1, 300
    wrong, used = 0, []
    for seed in range(trials):
        smoothed.seed = seed
        cert = smoothed.certify_adaptive_sync(
            x, n0=20, n_max=3000, alpha=alpha, target_radius=truth
        )
        wrong += cert.radius > truth
        used.append(cert.n)
    smoothed.close()
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert max(used) <= 3000


@pytest.fixture()
def linear(tmp_path):
    def make(b: float) -> Smoothed:
        spec = write_linear(tmp_path / f"lin_{abs(hash(b))}.py", W, b)
        return Smoothed(open_blackbox(spec), sigma=SIGMA, device="cpu")

    return make


def test_easy_input_stops_far_earlier_than_n(linear):
    x = np.full((1, 3, 3), 0.9, np.float32)
    smoothed = linear(3.0)  # margin 5 σ‖w‖ away: pA ≈ 1
    cert = smoothed.certify_adaptive_sync(x, n0=100, n_max=100_000, alpha=0.001, target_radius=0.5)
    fixed = smoothed.certify_sync(x, n0=100, n=100_000, alpha=0.001)
    smoothed.close()
    assert cert.n == stats.looks(100_000)[0] == 128  # 128 of 128 votes clear Φ(1) at α/K
    assert cert.queries_sent + cert.queries_cached == 100 + cert.n
    assert cert.radius >= 0.5 and cert.label == fixed.label == 1
    assert (fixed.queries_sent + fixed.queries_cached) / (100 + cert.n) > 100
    assert cert.mode == "target" and cert.looks == 1 and cert.n_max == 100_000


def test_hopeless_input_stops_early_for_futility(linear):
    x = np.full((1, 3, 3), 0.5, np.float32)
    smoothed = linear(-(W.sum() * 0.5))  # on the boundary: pA = 1/2
    cert = smoothed.certify_adaptive_sync(x, n0=100, n_max=100_000, alpha=0.001, target_radius=0.5)
    smoothed.close()
    assert cert.abstain or cert.radius < 0.5
    assert cert.n <= 1024  # Φ(2) is out of reach long before 100,000


def test_budget_mode_never_crosses_the_budget_and_reports_a_valid_radius(linear):
    x = np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(1, 3, 3)
    smoothed = linear(0.3)
    cert = smoothed.certify_adaptive_sync(x, n0=100, n_max=5_000, alpha=0.001)
    smoothed.close()
    assert cert.n == 5_000 and cert.mode == "budget"
    assert 0 < cert.radius <= true_radius(x, 0.3)
    k = cert.counts[cert.label]
    level = 0.001 / len(stats.looks(5_000))
    assert cert.p_lower == pytest.approx(stats.lower_confidence_bound(k, 5_000, level))


def test_schedule_is_fixed_and_ends_at_n():
    assert stats.looks(100_000)[:3] == [128, 256, 512] and stats.looks(100_000)[-1] == 100_000
    assert stats.looks(50) == [50] and stats.looks(129) == [128, 129]
    assert stats.p_needed(0.0, 0.25) == 0.5
    assert stats.p_needed(0.25, 0.25) == pytest.approx(norm.cdf(1.0))
    for k, n in ((0, 10), (3, 10), (10, 10)):
        lo, hi = stats.lower_confidence_bound(k, n, 0.01), stats.upper_confidence_bound(k, n, 0.01)
        assert lo <= k / n <= hi
