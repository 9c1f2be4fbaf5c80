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


@pytest.mark.slow
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
    assert cert.n0 == 16  # 16 of 16 selection votes settle cA (stats.selected)
    assert cert.queries_sent + cert.queries_cached == 16 + cert.n
    assert cert.radius >= 0.5 and cert.label == fixed.label == 1
    assert (fixed.queries_sent + fixed.queries_cached) / (16 + cert.n) > 100
    assert fixed.n0 == 100  # the fixed protocol keeps Cohen et al.'s n0
    assert cert.mode == "target" and cert.schedule_looks == 1 and cert.n_max == 100_000


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
    k = cert.counts[cert.label]  # the last look's bound is at α itself (see certify_adaptive)
    assert cert.p_lower == pytest.approx(stats.lower_confidence_bound(k, 5_000, 0.001))


def test_schedule_is_fixed_and_ends_at_n():
    assert stats.looks(100_000)[:3] == [128, 256, 512] and stats.looks(100_000)[-1] == 100_000
    assert stats.looks(50) == [50] and stats.looks(129) == [128, 129]
    assert stats.p_needed(0.0, 0.25) == 0.5
    assert stats.p_needed(0.25, 0.25) == pytest.approx(norm.cdf(1.0))
    for k, n in ((0, 10), (3, 10), (10, 10)):
        lo, hi = stats.lower_confidence_bound(k, n, 0.01), stats.upper_confidence_bound(k, n, 0.01)
        assert lo <= k / n <= hi


# -- the confidence sequence (bound="cs") -------------------------------------------------------


@pytest.mark.parametrize(
    "p, prior",
    [
        (0.5, stats.CS_PRIOR),
        (0.84, stats.CS_PRIOR),
        (0.977, stats.CS_PRIOR),
        (0.84, stats.cs_prior(0.84)),
        (0.99, stats.cs_prior(0.977)),
    ],
)
def test_confidence_sequence_covers_p_at_every_n_at_once(p, prior):
    """Time-uniform coverage: over paths of N Bernoulli(p) votes, the fraction where p leaves the
    sequence at ANY n ≤ N (M_n(p) ≥ 1/α: p outside [cs_lower, cs_upper]) is ≤ α + 3 SE."""
    rng = np.random.default_rng(1)
    alpha, n_paths, horizon = 0.05, 2000, 4000
    k = np.cumsum(rng.random((n_paths, horizon), dtype=np.float32) < p, axis=1)
    missed = np.zeros(n_paths, dtype=bool)
    level = -np.log(alpha)
    for n in range(1, horizon + 1):
        missed |= stats.cs_log_ratio(k[:, n - 1], n, p, prior) >= level
    rate = missed.mean()
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / n_paths)
    # the bounds are the sequence's ends: outside exactly when the ratio crosses 1/α
    path, n = k[np.argmax(missed)], horizon // 2
    lo, hi = (
        stats.cs_lower_bound(path[n - 1], n, alpha, prior),
        stats.cs_upper_bound(path[n - 1], n, alpha, prior),
    )
    assert (not lo <= p <= hi) == (stats.cs_log_ratio(path[n - 1], n, p, prior) >= level)


def test_confidence_sequence_against_clopper_pearson():
    """Exact: at every fixed n the sequence is looser than Clopper–Pearson at α (it pays for
    holding at every n at once), and — measured — also looser than the union bound's α/K for
    K = 11 looks; near the target with the target's prior, by less than 0.0025. It wins by
    looking every ~10% of votes where the union bound looks every factor 2."""
    alpha, k_looks = 0.001, len(stats.looks(100_000))
    for p_hat in (0.6, 0.84, 0.9, 0.977, 0.995, 1.0):
        for n in (100, 1000, 10_000, 100_000, 10_000_000):
            k = round(p_hat * n)
            cs = stats.cs_lower_bound(k, n, alpha)
            assert cs <= stats.lower_confidence_bound(k, n, alpha)
            assert cs <= stats.lower_confidence_bound(k, n, alpha / k_looks) + 1e-12
            assert stats.cs_upper_bound(k, n, alpha) >= stats.upper_confidence_bound(k, n, alpha)
    for p_target in (norm.cdf(1), norm.cdf(2)):
        prior = stats.cs_prior(p_target)
        for n in (1000, 10_000, 100_000):
            k = round(p_target * n)
            gap = stats.lower_confidence_bound(k, n, alpha / k_looks) - stats.cs_lower_bound(
                k, n, alpha, prior
            )
            assert 0 <= gap < 0.0025
    # numerically sound at the extremes
    assert stats.cs_lower_bound(0, 10, alpha) == 0.0 and stats.cs_upper_bound(10, 10, alpha) == 1
    lo = stats.cs_lower_bound(9_000_000, 10_000_000, alpha)
    assert 0.8994 < lo < 0.9 < stats.cs_upper_bound(9_000_000, 10_000_000, alpha) < 0.9006
    assert 0.99999 < stats.cs_lower_bound(10**7, 10**7, alpha) < 1


def first_stop(k_at: np.ndarray, k_cert: np.ndarray, k_fut: np.ndarray) -> np.ndarray:
    """Per path, the index of the first look where the rule stops (the last look if none)."""
    stop = (k_at >= k_cert) | (k_at <= k_fut)
    stop[:, -1] = True
    return np.argmax(stop, axis=1)


def thresholds(schedule, alpha, p_target, prior):
    """Per look m: the fewest votes that certify at p_target and the most that give up."""
    k_cert, k_fut = [], []
    for m in schedule:
        ks = np.arange(m + 1)
        over = stats.cs_log_ratio(ks, m, p_target, prior) >= -np.log(alpha)
        up, down = (
            np.flatnonzero(over & (ks > p_target * m)),
            np.flatnonzero(over & (ks < p_target * m)),
        )
        k_cert.append(up[0] if len(up) else m + 1)
        k_fut.append(down[-1] if len(down) else -1)
    return np.array(k_cert), np.array(k_fut)


def test_confidence_sequence_keeps_wrong_certificates_below_alpha_at_dense_looks():
    """pA just below the target, looked at every ~10% of votes with the sequence at α: the
    reported lower bound exceeds pA (a wrong certificate) in ≤ α + 3 SE of the runs."""
    rng = np.random.default_rng(2)
    alpha, n, trials, p_target, p_a = 0.05, 12_800, 4000, 0.9, 0.897
    prior = stats.cs_prior(p_target)
    schedule = stats.looks(n, first=16, growth=1.1)
    k_cert, k_fut = thresholds(schedule, alpha, p_target, prior)
    # the thresholds are cs_decided's: spot-check them against the functions themselves
    for i in (0, len(schedule) // 2, len(schedule) - 1):
        m = schedule[i]
        if k_cert[i] <= m:
            assert stats.cs_decided(int(k_cert[i]), m, alpha, p_target, prior)
            assert not stats.cs_decided(int(k_cert[i]) - 1, m, alpha, p_target, prior) or (
                k_cert[i] - 1 <= k_fut[i]
            )
    steps = np.diff([0, *schedule])
    k_at = np.cumsum(rng.binomial(steps, p_a, size=(trials, len(schedule))), axis=1)
    at = first_stop(k_at, k_cert, k_fut)
    k_stop = k_at[np.arange(trials), at]
    m_stop = np.array(schedule)[at]
    # cs_lower_bound(k, m) > pA exactly when pA is outside the sequence below k/m
    over = np.array(
        [
            stats.cs_log_ratio(int(k), int(m), p_a, prior)
            for k, m in zip(k_stop, m_stop, strict=True)
        ]
    )
    wrong = int(((over >= -np.log(alpha)) & (k_stop > p_a * m_stop)).sum())
    for k, m in list(zip(k_stop, m_stop, strict=True))[:20]:  # the same, by the bound itself
        lower = stats.cs_lower_bound(int(k), int(m), alpha, prior)
        assert (lower > p_a) == (stats.cs_log_ratio(int(k), int(m), p_a, prior) >= -np.log(alpha))
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_budget_mode_final_look_at_alpha_keeps_wrong_certificates_below_alpha():
    """--budget: early stops only abstain (upper bound < 1/2), the last look certifies with
    Clopper–Pearson at α itself. Wrong certificates (lower bound > pA at the last look) stay
    ≤ α + 3 SE, with early stops by either rule (union α/K, or the sequence at α)."""
    rng = np.random.default_rng(3)
    alpha, n, trials = 0.1, 1600, 4000
    for p_a in (0.55, 0.47):
        for bound in ("union", "cs"):
            if bound == "union":
                schedule = stats.looks(n, first=100)
                fut = [
                    max(
                        [
                            k
                            for k in range(m + 1)
                            if stats.upper_confidence_bound(k, m, alpha / len(schedule)) < 0.5
                        ],
                        default=-1,
                    )
                    for m in schedule
                ]
            else:
                schedule = stats.looks(n, first=16, growth=1.1)
                fut = thresholds(schedule, alpha, 0.5, stats.CS_PRIOR)[1]
            steps = np.diff([0, *schedule])
            k_at = np.cumsum(rng.binomial(steps, p_a, size=(trials, len(schedule))), axis=1)
            never = np.full(len(schedule), n + 2)
            at = first_stop(k_at, never, np.array(fut))
            reached = at == len(schedule) - 1
            k_last = k_at[reached, -1]
            wrong = sum(stats.lower_confidence_bound(int(k), n, alpha) > p_a for k in k_last)
            assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
            if p_a == 0.47:  # early abstentions do happen: the stop picks who reaches the end
                assert reached.mean() < 0.9


@pytest.mark.slow
def test_adaptive_cs_certificates_on_a_linear_classifier_stay_within_alpha(tmp_path):
    """End to end through Smoothed with bound="cs": P[certified radius > true radius] ≤ α + 3 SE
    with the target right at the true radius; the certificate says which bound it used."""
    spec = write_linear(tmp_path / "lin.py", W, 0.0)
    x = np.full((1, 3, 3), 0.35, np.float32)
    truth = true_radius(x, 0.0)
    smoothed = Smoothed(open_blackbox(spec), sigma=SIGMA, device="cpu")
    alpha, trials = 0.1, 150
    wrong = 0
    for seed in range(trials):
        smoothed.seed = seed
        cert = smoothed.certify_adaptive_sync(
            x, n0=20, n_max=3000, alpha=alpha, target_radius=truth, bound="cs"
        )
        wrong += cert.radius > truth
        assert cert.bound == "cs" and cert.to_json()["bound"] == "cs" and cert.n <= 3000
    smoothed.close()
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_cs_stops_an_easy_input_sooner_than_the_union_bound(linear):
    x = np.full((1, 3, 3), 0.9, np.float32)
    smoothed = linear(3.0)  # pA ≈ 1
    union = smoothed.certify_adaptive_sync(x, n0=100, n_max=100_000, alpha=0.001, target_radius=0.5)
    cs = smoothed.certify_adaptive_sync(
        x, n0=100, n_max=100_000, alpha=0.001, target_radius=0.5, bound="cs"
    )
    smoothed.close()
    assert union.bound == "union" and cs.bound == "cs"
    assert cs.radius >= 0.5 and cs.label == union.label == 1
    assert cs.n < union.n == 128
    assert cs.p_lower == pytest.approx(
        stats.cs_lower_bound(cs.n, cs.n, 0.001, stats.cs_prior(stats.p_needed(0.5, SIGMA)))
    )


def test_futility_stops_only_when_an_optimistic_future_cannot_certify():
    """Curtailment: the remaining votes are credited at the upper end of a 99% confidence
    sequence for the rate, plus 3 standard deviations of luck; the run's own bound at n_max
    decides. At m = n_max there is nothing left to curtail."""

    def final(k: float, n: int) -> float:
        return stats.lower_confidence_bound(k, n, 0.001)

    assert stats.futile(1700, 2000, 10_000, 0.9, final)  # 0.85: hopeless at Φ⁻¹(0.9)
    assert not stats.futile(910, 1000, 10_000, 0.9, final)  # 0.91: may still certify
    assert not stats.futile(9000, 10_000, 10_000, 0.9, final)
    # the optimism is what keeps a borderline input going: 0.89 after 500 votes is not futile
    assert not stats.futile(445, 500, 10_000, 0.9, final)
    assert stats.futile(4450, 5000, 10_000, 0.9, final)  # 0.89 after 5,000 votes is


def test_futility_saves_the_cap_on_inputs_just_below_the_target_and_costs_little_above():
    """Looked at every ~10% of votes, as `--bound cs` looks. pA just below the target: without
    curtailment every run spends n_max before it abstains; with it, most stop far sooner. pA
    just above: curtailment takes away ≤ 2 points of the runs that would have certified (each
    of them a correct certificate). Clopper–Pearson at α as the final bound keeps this fast."""
    rng = np.random.default_rng(4)
    alpha, n, trials, p_target = 0.001, 20_000, 2000, 0.9
    schedule = stats.looks(n, first=16, growth=1.1)

    def lower(k: float, m: int) -> float:
        return stats.lower_confidence_bound(k, m, alpha)

    def futile_below(m: int) -> int:
        """The smallest k that is not futile at look m (futile is monotone in k)."""
        lo, hi = 0, m + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if stats.futile(mid, m, n, p_target, lower):
                lo = mid + 1
            else:
                hi = mid
        return lo

    k_keep = np.array([futile_below(m) for m in schedule])
    assert stats.futile(int(k_keep[5]) - 1, schedule[5], n, p_target, lower)
    assert not stats.futile(int(k_keep[5]), schedule[5], n, p_target, lower)

    def runs(p_a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Votes used with curtailment; certified at n without it; certified with it."""
        k_at = np.cumsum(rng.binomial(np.diff([0, *schedule]), p_a, (trials, len(schedule))), 1)
        stopped = k_at < k_keep
        used = np.where(stopped.any(1), np.array(schedule)[stopped.argmax(1)], n)
        certified = np.array([lower(k, n) >= p_target for k in k_at[:, -1]])
        return used, certified, certified & ~stopped.any(1)

    assert runs(0.895)[0].mean() < 0.5 * n
    _, without, with_ = runs(0.907)
    assert without.mean() > 0.5  # without curtailment most of these runs certify …
    assert without.mean() - with_.mean() <= 0.02  # … and curtailment keeps them


def test_curtailment_stops_an_out_of_reach_target_early_and_can_be_turned_off(linear):
    x = np.full((1, 3, 3), 0.35, np.float32)
    smoothed = linear(0.0)
    truth = true_radius(x, 0.0)
    for bound in ("union", "cs"):
        runs = {
            f: smoothed.certify_adaptive_sync(
                x,
                n0=50,
                n_max=20_000,
                alpha=0.001,
                target_radius=truth * 1.1,
                bound=bound,
                futility=f,
            )
            for f in (False, True)
        }
        for cert in runs.values():
            assert cert.abstain or cert.radius < truth * 1.1  # out of reach: never certified
        assert runs[True].n < runs[False].n == 20_000, bound
    smoothed.close()


def test_selection_stops_once_one_class_holds_a_clear_majority():
    assert stats.selected({1: 16}, 16) and stats.selected({1: 15, 2: 1}, 16)
    assert not stats.selected({1: 9, 2: 7}, 16)
    assert not stats.selected({stats.OTHER: 16}, 16)  # OTHER is never a candidate
    assert not stats.selected({1: 60, 2: 40}, 100)  # a lead, but not a proven majority
    assert stats.looks(100, first=16) == [16, 32, 64, 100] and stats.looks(10, first=16) == [10]


def test_selection_picks_a_class_without_a_majority_rarely():
    """Two classes at 1/2 each: neither has a majority, so every early stop is an error of the
    selection rule. Over its four looks it fires in ≤ 4 × 0.1% of the runs (+3 SE)."""
    rng = np.random.default_rng(5)
    trials, schedule = 20_000, stats.looks(100, first=16)
    k_at = np.cumsum(rng.binomial(np.diff([0, *schedule]), 0.5, (trials, len(schedule))), 1)
    fired = np.zeros(trials, bool)
    for j, m in enumerate(schedule):
        fired |= [stats.selected({1: int(k), 2: m - int(k)}, m) for k in k_at[:, j]]
    bound = len(schedule) * stats.SELECTION_LEVEL
    assert fired.mean() <= bound + 3 * np.sqrt(bound / trials)


def test_a_split_vote_runs_the_selection_to_n0(linear):
    x = np.full((1, 3, 3), 0.5, np.float32)
    smoothed = linear(-(W.sum() * 0.5))  # on the boundary: pA = 1/2
    cert = smoothed.certify_adaptive_sync(x, n0=100, n_max=2_000, alpha=0.001, target_radius=0.1)
    smoothed.close()
    assert cert.n0 == 100 and sum(cert.counts_selection.values()) == 100
