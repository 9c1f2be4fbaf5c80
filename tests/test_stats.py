"""The statistics against exact answers and by Monte Carlo coverage."""

import numpy as np
import pytest
from scipy.stats import binomtest, norm

from blackbox_smooth import stats
from blackbox_smooth.stats import ABSTAIN, OTHER


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_lower_bound_equals_exact_one_sided_interval(n, alpha):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if k < 0:
            continue
        # A one-sided (1 − α) bound is the lower end of the two-sided (1 − 2α) exact interval.
        expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
        assert stats.lower_confidence_bound(k, n, alpha) == pytest.approx(expected, abs=1e-12)


def test_lower_bound_is_zero_at_k_zero_and_alpha_root_at_k_n():
    assert stats.lower_confidence_bound(0, 50, 0.001) == 0.0
    assert stats.lower_confidence_bound(50, 50, 0.001) == pytest.approx(0.001 ** (1 / 50))


def test_lower_bound_rejects_impossible_counts():
    with pytest.raises(ValueError):
        stats.lower_confidence_bound(11, 10, 0.01)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95, 0.995])
def test_lower_bound_covers_at_nominal_level(p):
    rng = np.random.default_rng(1)
    alpha, n, trials = 0.05, 200, 4000
    ks = rng.binomial(n, p, size=trials)
    misses = sum(stats.lower_confidence_bound(int(k), n, alpha) > p for k in ks)
    # Clopper–Pearson is conservative: misses ≤ α up to Monte Carlo error (4 standard errors).
    assert misses / trials <= alpha + 4 * np.sqrt(alpha * (1 - alpha) / trials)


def test_radius_and_max_radius():
    assert stats.radius(0.5, norm.cdf(1.2)) == pytest.approx(0.6)
    assert stats.max_radius(0.25, 10_000, 0.001) == pytest.approx(
        0.25 * norm.ppf(0.001 ** (1 / 10_000))
    )
    assert stats.max_radius(0.25, 100_000, 0.001) > stats.max_radius(0.25, 10_000, 0.001)


def test_certify_abstains_below_half_and_on_other():
    assert stats.certify({3: 10}, {3: 40, 1: 60}, 100, 0.001, 0.5).label == ABSTAIN
    assert stats.certify({OTHER: 8, 3: 2}, {3: 100}, 100, 0.001, 0.5).label == ABSTAIN
    r = stats.certify({3: 10}, {3: 990, OTHER: 10}, 1000, 0.001, 0.5)
    assert r.label == 3 and not r.abstain
    assert r.p_lower == pytest.approx(stats.lower_confidence_bound(990, 1000, 0.001))
    assert r.radius == pytest.approx(0.5 * norm.ppf(r.p_lower))


def test_certify_estimates_the_class_chosen_by_selection_only():
    # Selection says 2; the estimation counts of 5 must not be used even though they win there.
    r = stats.certify({2: 60, 5: 40}, {2: 300, 5: 700}, 1000, 0.001, 0.25)
    assert r.label == ABSTAIN
    assert r.p_lower == pytest.approx(stats.lower_confidence_bound(300, 1000, 0.001))


def test_predict_uses_two_sided_binomial_test_on_top_two():
    label, p = stats.predict({1: 60, 2: 40, 3: 900}, 0.001)
    assert label == 3 and p == pytest.approx(binomtest(900, 960, 0.5).pvalue)
    label, p = stats.predict({1: 52, 2: 48}, 0.05)
    assert label == ABSTAIN and p == pytest.approx(binomtest(52, 100, 0.5).pvalue)
    assert stats.predict({OTHER: 90, 1: 10}, 0.05)[0] == ABSTAIN
    assert stats.predict({}, 0.05)[0] == ABSTAIN


def test_bounds_are_scipy_stats_values_bit_for_bit():
    """stats.py computes the Clopper–Pearson bounds and Φ, Φ⁻¹ with scipy.special (a second
    less import per process): they must be scipy.stats' beta.ppf and norm's, to the bit."""
    from scipy.stats import beta

    for n in (1, 2, 7, 100, 550, 1000, 100_000):
        for k in sorted(k for k in {1, 2, n // 3, n // 2, n - 1, n} if 1 <= k <= n):
            for alpha in (0.001, 0.05, 0.5):
                lower = stats.lower_confidence_bound(k, n, alpha)
                assert lower == beta.ppf(alpha, k, n - k + 1), (k, n, alpha)
                if k < n:
                    upper = stats.upper_confidence_bound(k, n, alpha)
                    assert upper == beta.ppf(1 - alpha, k + 1, n - k), (k, n, alpha)
                if lower > 0.5:
                    assert stats.radius(0.5, lower) == 0.5 * norm.ppf(lower)
    for r in (0.0, 0.1, 0.25, 1.0, 2.5):
        assert stats.p_needed(r, 0.5) == norm.cdf(r / 0.5)


BAD_ALPHAS = [0.0, 1.0, -0.1, 1.5, float("nan")]


@pytest.mark.parametrize("alpha", BAD_ALPHAS)
def test_every_bound_and_certify_refuse_alpha_outside_0_1(alpha):
    # at α = 1 the all-votes bound would be 1: an infinite radius from any votes
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        stats.certify({0: 10}, {0: 100}, 100, alpha, 0.25)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        stats.certify({OTHER: 10}, {}, 100, alpha, 0.25)  # even where it would abstain at once
    for bound in (stats.lower_confidence_bound, stats.upper_confidence_bound,
                  stats.cs_lower_bound, stats.cs_upper_bound):  # fmt: skip
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            bound(50, 100, alpha)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        stats.predict({0: 90, 1: 10}, alpha)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_certify_and_p_needed_refuse_a_sigma_that_is_not_finite_and_positive(sigma):
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        stats.certify({0: 10}, {0: 100}, 100, 0.001, sigma)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        stats.p_needed(0.5, sigma)


@pytest.mark.parametrize("target", [float("nan"), -0.1, float("inf")])
def test_p_needed_and_cs_prior_refuse_a_target_that_is_not_a_finite_radius(target):
    with pytest.raises(ValueError, match="target radius must be a finite number >= 0"):
        stats.p_needed(target, 0.25)
    with pytest.raises(ValueError, match=r"p_target must be in \[0, 1\]"):
        stats.cs_prior(float("nan"))
    assert stats.p_needed(0.0, 0.25) == 0.5 and stats.cs_prior(None) == stats.CS_PRIOR


def test_certify_adaptive_refuses_bad_alpha_and_a_nan_target_in_the_api(tmp_path):
    from blackbox_smooth.adapters import open_blackbox
    from blackbox_smooth.errors import UsageError
    from blackbox_smooth.smooth import Smoothed

    from .conftest import write_linear

    spec = write_linear(tmp_path / "lin.py", np.ones(9), 0.0)
    smoothed = Smoothed(open_blackbox(spec), sigma=0.25, device="cpu", ledger=None)
    x = np.full((1, 3, 3), 0.3, np.float32)
    try:
        for alpha in BAD_ALPHAS:
            with pytest.raises(UsageError, match=r"--alpha must be in \(0, 1\)"):
                smoothed.certify_adaptive_sync(x, n0=20, n_max=200, alpha=alpha, target_radius=0.1)
        for target in (float("nan"), float("inf"), -1.0):
            with pytest.raises(UsageError, match="target-radius must be a finite number >= 0"):
                smoothed.certify_adaptive_sync(x, n0=20, n_max=200, target_radius=target)
        assert smoothed.votes.sent == 0  # refused before a query
        # a good target still certifies: the checks refuse only what is wrong
        assert not smoothed.certify_adaptive_sync(x, n0=20, n_max=200, target_radius=0.1).abstain
    finally:
        smoothed.close()


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_cli_refuses_a_target_radius_that_is_not_a_finite_radius_in_one_line(tmp_path, value):
    from .conftest import messages, run_cli, write_linear

    spec = write_linear(tmp_path / "lin.py", np.ones(9), 0.0)
    done = run_cli("certify", tmp_path / "x.png", "-e", spec, "--sigma", "0.25",
                   f"--target-radius={value}")  # fmt: skip
    assert done.returncode == 2
    shown = {"nan": "nan", "inf": "inf", "-1": "-1.0"}[value]
    assert messages(done.stderr) == [
        f"bbsmooth: error: --target-radius must be a finite number >= 0, got {shown}"
    ]


def test_a_run_stopped_short_of_its_target_returns_a_label_below_it_not_an_abstention(tmp_path):
    """docs/statistics.md §5: curtailed (or out of reach) is a smaller certificate, not -1."""
    from blackbox_smooth.adapters import open_blackbox
    from blackbox_smooth.smooth import Smoothed

    from .conftest import write_linear

    spec = write_linear(tmp_path / "lin.py", np.ones(9), 0.0)
    smoothed = Smoothed(open_blackbox(spec), sigma=0.25, device="cpu", ledger=None)
    x = np.full((1, 3, 3), 0.08, np.float32)  # pA = Φ(0.72/0.75): true radius ≈ 0.24
    try:
        for futility in (True, False):
            cert = smoothed.certify_adaptive_sync(
                x, n0=50, n_max=20_000, target_radius=0.5, futility=futility
            )
            assert cert.n < 20_000  # stopped early: 0.5 is out of reach
            assert cert.label == 1 and not cert.abstain and 0 < cert.radius < 0.5
    finally:
        smoothed.close()


def test_statistics_doc_names_functions_that_exist():
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "statistics.md").read_text()
    named = set(re.findall(r"`([a-z_]+)\.([a-z_]+)", text))
    ours = {(m, a) for m, a in named if (root / "blackbox_smooth" / f"{m}.py").is_file()}
    assert ("checks", "check_sigma") in ours and ("stats", "futile") in ours
    for module, attribute in sorted(ours):
        if attribute == "py":
            continue
        found = importlib.import_module(f"blackbox_smooth.{module}")
        inside = [found, *(v for v in vars(found).values() if isinstance(v, type))]
        assert any(hasattr(o, attribute) for o in inside), f"{module}.{attribute}"
