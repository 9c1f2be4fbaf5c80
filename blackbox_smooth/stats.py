"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter 2019), as pure functions.

`certify` and `predict` take vote counts and return the paper's answers; they never see a
classifier. Counts are dicts from class index to votes; OTHER collects answers outside the
label map and is a vote against the top class, never for it. A certificate that abstains has
the label ABSTAIN, never OTHER's value (blackbox.py).

Adaptive certification looks at the estimation counts at a fixed geometric schedule of sample
sizes m_1 < … < m_K = n and may stop at any look. Each look's Clopper–Pearson bound is taken at
level α/K, so by the union bound all K bounds hold at once with probability ≥ 1 − α, whatever
rule picks the look that is reported. This is the simplest valid answer to the decision task
"is x certified at radius R?" as framed by Voráček (2024), "Treatment of statistical estimation
problems in randomized smoothing" (arXiv:2406.17830). Re-using the level-α bound at every look
would not be valid: each look is another chance for the bound to fail (docs/statistics.md).
Beside it, `cs_lower_bound`/`cs_upper_bound` are such a confidence sequence (a beta-binomial
mixture martingale and Ville's inequality): valid at every n at once at level α itself, so the
votes may be looked at as often as wanted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# scipy.special's functions, not scipy.stats' distributions: the same values bit for bit
# (beta.ppf is betaincinv, norm.ppf ndtri, norm.cdf ndtr), without the second of import that
# scipy.stats and scipy.optimize cost every `bbsmooth` process (they are imported where used)
from scipy.special import betaincinv, betaln, ndtr, ndtri, xlog1py, xlogy

from .blackbox import OTHER

ABSTAIN = -1  # the label of a certificate that abstains (never a class: classes are ≥ 0)


@dataclass(frozen=True)
class CertifyResult:
    label: int  # ABSTAIN (-1) when abstaining
    p_lower: float
    radius: float  # 0 when abstaining

    @property
    def abstain(self) -> bool:
        return self.label == ABSTAIN


def check_alpha(alpha: float) -> None:
    """Refuse a level outside (0, 1), NaN included: at α = 1 the lower bound is 1 and every
    vote "certifies" an infinite radius; at α = 0 or below no bound exists."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _finite_sigma(sigma: float) -> None:
    """σ must be finite and > 0: a NaN σ gives NaN radii, σ = ∞ "certifies" every radius."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")


def lower_confidence_bound(k: float, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on p from k successes in n trials."""
    check_alpha(alpha)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 0.0
    return float(betaincinv(k, n - k + 1, alpha))


def radius(sigma: float, p_lower: float) -> float:
    """l2 radius σ·Φ⁻¹(p_lower) certified by a lower bound p_lower > 1/2."""
    return float(sigma * ndtri(p_lower))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius (n, α) can ever certify: all n votes for the top class."""
    return radius(sigma, lower_confidence_bound(n, n, alpha))


def top_class(counts: Mapping[int, int]) -> int:
    """The most-voted outcome (OTHER included); ties go to the smaller class index."""
    if not counts:
        return OTHER
    return max(sorted(counts), key=lambda c: counts[c])


# Selection may stop once its top class holds more than half the votes at this level.
SELECTION_LEVEL = 0.001


def selected(counts: Mapping[int, int], m: int, level: float = SELECTION_LEVEL) -> bool:
    """Whether m selection votes already settle cA: the top class's share has a Clopper–Pearson
    lower bound above 1/2 at `level`, so it is the smoothed classifier's only candidate (no other
    class can hold more than half). Stopping the selection early changes only which cA is
    chosen, never the estimation samples that bound it: CERTIFY stays valid for any cA."""
    top = top_class(counts)
    return top != OTHER and lower_confidence_bound(counts.get(top, 0), m, level) > 0.5


def certify(
    counts_selection: Mapping[int, int],
    counts_estimation: Mapping[int, int],
    n: int,
    alpha: float,
    sigma: float,
) -> CertifyResult:
    """CERTIFY: guess cA from the selection votes, bound pA from the disjoint estimation votes."""
    check_alpha(alpha)  # before any early answer: bad input is refused whatever the votes
    _finite_sigma(sigma)
    c_a = top_class(counts_selection)
    if c_a == OTHER:
        return CertifyResult(ABSTAIN, 0.0, 0.0)
    p_lower = lower_confidence_bound(counts_estimation.get(c_a, 0), n, alpha)
    if p_lower <= 0.5:  # Cohen et al. certify only when the bound exceeds 1/2
        return CertifyResult(ABSTAIN, p_lower, 0.0)
    return CertifyResult(c_a, p_lower, radius(sigma, p_lower))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson upper bound on p from k successes in n trials."""
    check_alpha(alpha)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == n:
        return 1.0
    return float(betaincinv(k + 1, n - k, 1 - alpha))


def looks(n: int, first: int = 128, growth: float = 2.0) -> list[int]:
    """The fixed schedule of estimation sample sizes where adaptive certification may stop:
    first, first·growth, …, and n itself. Fixed in advance: it must not depend on the votes."""
    schedule, m = [], first
    while m < n:
        schedule.append(m)
        m = max(m + 1, round(m * growth))
    return [*schedule, n]


def p_needed(target_radius: float, sigma: float) -> float:
    """The pA lower bound that certifies radius R: Φ(R/σ) (1/2 for R = 0). A NaN R would
    make every comparison with it false: such a run would never stop nor certify its target."""
    if not (math.isfinite(target_radius) and target_radius >= 0):
        raise ValueError(f"target radius must be a finite number >= 0, got {target_radius}")
    _finite_sigma(sigma)
    return float(ndtr(target_radius / sigma))


def decided(k: int, m: int, alpha_look: float, p_target: float | None) -> bool:
    """Whether one look settles the question at level α_look. With a target, stop when pA's
    lower bound clears Φ(R/σ) (certified at R) or its upper bound falls below it (it never
    will be); without one, stop only when the upper bound is below 1/2 (nothing to certify)."""
    upper = upper_confidence_bound(k, m, alpha_look)
    if p_target is None:
        return upper < 0.5
    return upper < p_target or lower_confidence_bound(k, m, alpha_look) >= p_target


# -- the confidence sequence: bounds valid at every n at once ---------------------------------

# A mixing prior: (weight, a, b) components of a mixture of Beta(a, b) densities, weights
# summing to 1.
Prior = tuple[tuple[float, float, float], ...]

# Beta(1, 1/2): density rising towards 1, where the pA of randomized smoothing lives. All-correct
# votes (k = n) cost ≈ ½·log n nats (log n under the uniform prior), so an easy input stops after
# ~55 votes at Φ(1) (65 uniform); pA in [0.5, 0.99] pays < 0.1 in the bound's 4th digit more.
CS_PRIOR: Prior = ((1.0, 1.0, 0.5),)
_LO, _HI = 1e-300, float(np.nextafter(1.0, 0.0))


def cs_prior(p_target: float | None, concentration: float = 1000.0) -> Prior:
    """The prior for a question fixed in advance, "is pA ≥ p_target?": half Beta(1, 1/10) (easy
    inputs: its mass crowds against 1, where most inputs' pA lies, so all-correct votes cost
    ≈ 0.1·log n nats and an easy input is certified at Φ(2) after ~360 votes, against ~470 under
    Beta(1, 1/2) and 295 for a single fixed-n Clopper–Pearson bound), half
    Beta(c·p_target, c·(1 − p_target)), c = 1000 (an effective prior sample size: inputs whose
    pA sits near the target need 10³–10⁵ votes, and there the mixture pays ≈ ½·log(n/c) + log 2
    nats instead of ≈ ½·log(2π·n·p(1 − p))). Any prior chosen before the votes keeps the
    guarantee; this one only decides where the sequence is tight."""
    if p_target is not None and not 0 <= p_target <= 1:  # NaN too: it is no target
        raise ValueError(f"p_target must be in [0, 1], got {p_target}")
    if p_target is None or not 0.5 < p_target < 1:
        return CS_PRIOR
    c = concentration
    return ((0.5, 1.0, 0.1), (0.5, c * p_target, c * (1 - p_target)))


def cs_log_ratio(k: Any, n: int, p0: float, prior: Prior = CS_PRIOR) -> Any:
    """log M_n(p0), the prior mixture of Bernoulli likelihood ratios against p0 after k successes
    in n trials: Σ_j w_j · B(a_j + k, b_j + n − k) / B(a_j, b_j) / (p0^k (1 − p0)^(n − k)).
    Under p = p0 it is a nonnegative martingale with M_0 = 1 (Robbins' method of mixtures).
    In logs (betaln, xlogy, logaddexp): exact for any n. Log-convex in p0 and in k. `k` may be
    an array (one ratio per count)."""
    k = np.asarray(k, dtype=float)
    log_lik = xlogy(k, p0) + xlog1py(n - k, -p0)
    terms = [math.log(w) + betaln(a + k, b + n - k) - betaln(a, b) - log_lik for w, a, b in prior]
    # numpy's ufunc, not scipy's logsumexp: the same stable sum at a tenth of the cost per call,
    # which a root search calls thousands of times
    out = np.logaddexp.reduce(np.asarray(terms), axis=0)
    return float(out) if out.ndim == 0 else out


def _cs_root(k: float, n: int, alpha: float, lo: float, hi: float, prior: Prior) -> float:
    from scipy.optimize import brentq

    level = -math.log(alpha)
    root = brentq(lambda p: cs_log_ratio(k, n, p, prior) - level, lo, hi, xtol=1e-15, rtol=1e-15)
    return float(root)


def cs_lower_bound(k: float, n: int, alpha: float, prior: Prior = CS_PRIOR) -> float:
    """Lower end of the (1 − α) confidence sequence {p0 : M_n(p0) < 1/α}: for every p,
    P_p[∃ n ≥ 1 : p < cs_lower_bound(k_n, n, α)] ≤ α, so it holds at any stopping time, however
    chosen. Why: p below the bound means M_n(p) ≥ 1/α, and by Ville's inequality the martingale
    M_n(p) ever reaching 1/α has probability ≤ α. Two-sided: with `cs_upper_bound` at the same
    α, both ends hold together with probability ≥ 1 − α (M_n is log-convex in p0: an interval)."""
    check_alpha(alpha)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 0.0
    # M_n ≤ 1 at the MLE k/n (a mixture never beats the best likelihood): k/n is inside.
    return _cs_root(k, n, alpha, _LO, k / n, prior)


def cs_upper_bound(k: int, n: int, alpha: float, prior: Prior = CS_PRIOR) -> float:
    """Upper end of the same (1 − α) confidence sequence: P_p[∃ n : p > cs_upper_bound] ≤ α by
    Ville's inequality as for `cs_lower_bound` (both ends together: still α in total)."""
    check_alpha(alpha)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == n or cs_log_ratio(k, n, _HI, prior) < -math.log(alpha):
        return 1.0  # (the second: the bound is within float resolution of 1)
    return _cs_root(k, n, alpha, k / n, _HI, prior)


def cs_decided(k: int, m: int, alpha: float, p_target: float | None, prior: Prior) -> bool:
    """`decided` with the confidence sequence at level α itself (no split over the looks)."""
    upper = cs_upper_bound(k, m, alpha, prior)
    if p_target is None:
        return upper < 0.5
    return upper < p_target or cs_lower_bound(k, m, alpha, prior) >= p_target


def certify_lower(c_a: int, p_lower: float, sigma: float) -> CertifyResult:
    """CERTIFY's answer from a lower bound on p_{c_A} computed elsewhere (a confidence
    sequence): abstain unless it exceeds 1/2, else radius σ·Φ⁻¹(p_lower)."""
    if c_a == OTHER or p_lower <= 0.5:
        return CertifyResult(ABSTAIN, p_lower, 0.0)
    return CertifyResult(c_a, p_lower, radius(sigma, p_lower))


def predict(counts: Mapping[int, int], alpha: float) -> tuple[int, float]:
    """PREDICT: the top class if the two-sided binomial test on the top two counts rejects a
    tie at level α, else ABSTAIN. Returns (label, p-value)."""
    from scipy.stats import binomtest

    check_alpha(alpha)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked or ranked[0][0] == OTHER:
        return ABSTAIN, 1.0
    n_a = ranked[0][1]
    n_b = ranked[1][1] if len(ranked) > 1 else 0
    p_value = float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return (ranked[0][0] if p_value <= alpha else ABSTAIN), p_value


# Curtailment's optimism: the future votes are assumed to come at the upper end of a (1 − γ)
# confidence sequence for the rate (valid at every look at once), and to beat that rate by
# FUTURE_LUCK standard deviations more.
FUTILITY_LEVEL = 0.01
FUTURE_LUCK = 3.0


def futile(
    k: int, m: int, n_max: int, p_target: float, final_lower: Callable[[float, int], float]
) -> bool:
    """Curtailment: stop when even a lucky future cannot certify by n_max. The
    remaining r = n_max − m votes are credited at rate u, the upper end of the (1 − γ)
    confidence sequence of k/m, plus 3 standard deviations of their own (3·√(r·u(1 − u))); if
    the run's own bound at n_max (`final_lower`) would still be below p_target, the run
    stops now. It then reports what the bound at this look certifies: cA at a radius below
    the target, or an abstention only when that bound is at most 1/2.

    Sound without any share of α: the bound at every look of the schedule holds at once, so
    the radius of whichever look a stopping rule picks keeps the guarantee. What it can cost
    is a certificate that the run would have reached by n_max, which needs pA above u at some
    look (probability ≤ γ = 1%, the sequence holding at every look at once) or the future votes
    beating their mean by 3 standard deviations (≈ 0.1%). What it saves is the n_max votes that
    inputs just below the target spend before falling short anyway."""
    if m >= n_max:
        return False
    u = cs_upper_bound(k, m, FUTILITY_LEVEL)
    r = n_max - m
    lucky = k + u * r + FUTURE_LUCK * math.sqrt(r * u * (1 - u))
    return final_lower(min(n_max, lucky), n_max) < p_target


# -- intervals for comparing classifiers on the same noise draws (training, benchmarks) ---------

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


def wilson_interval(successes: Any) -> tuple[float, float, float]:
    """(rate, 95% Wilson interval) of a vector of 0/1 outcomes."""
    x = np.asarray(successes, dtype=np.float64)
    n, p = len(x), float(x.mean())
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(now: Any, before: Any) -> tuple[float, float, float]:
    """(mean difference, 95% interval) of two 0/1 vectors over the same items and noise: what
    both share cancels, so the interval is that of the change alone."""
    d = np.asarray(now, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    if len(d) < 2:
        return float(d.mean()), -math.inf, math.inf
    half = Z95 * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean()) - half, float(d.mean()) + half
