"""The statistics of randomized smoothing (Cohen, Rosenfeld & Kolter 2019), as pure functions.

`certify` and `predict` take vote counts and return the paper's answers; they never see a
classifier. Counts are dicts from class index to votes; OTHER (-1) collects answers outside the
label map and is a vote against the top class, never for it.

Adaptive certification looks at the estimation counts at a fixed geometric schedule of sample
sizes m_1 < … < m_K = n and may stop at any look. Each look's Clopper–Pearson bound is taken at
level α/K, so by the union bound all K bounds hold at once with probability ≥ 1 − α, whatever
rule picks the look that is reported. This is the simplest valid answer to the decision task
"is x certified at radius R?" as framed by Voráček (2024), "Treatment of statistical estimation
problems in randomized smoothing" (arXiv:2406.17830), which also gives tighter confidence
sequences. Re-using the level-α bound at every look would not be valid (DESIGN.md rule 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import beta, binomtest, norm

from .errors import UsageError

OTHER = -1
ABSTAIN = -1


@dataclass(frozen=True)
class CertifyResult:
    label: int  # ABSTAIN (-1) when abstaining
    p_lower: float
    radius: float  # 0 when abstaining

    @property
    def abstain(self) -> bool:
        return self.label == ABSTAIN


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on p from k successes in n trials."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def radius(sigma: float, p_lower: float) -> float:
    """l2 radius σ·Φ⁻¹(p_lower) certified by a lower bound p_lower > 1/2."""
    return float(sigma * norm.ppf(p_lower))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius (n, α) can ever certify: all n votes for the top class."""
    return radius(sigma, lower_confidence_bound(n, n, alpha))


def top_class(counts: Mapping[int, int]) -> int:
    """The most-voted outcome (OTHER included); ties go to the smaller class index."""
    if not counts:
        return OTHER
    return max(sorted(counts), key=lambda c: counts[c])


def certify(
    counts_selection: Mapping[int, int],
    counts_estimation: Mapping[int, int],
    n: int,
    alpha: float,
    sigma: float,
) -> CertifyResult:
    """CERTIFY: guess cA from the selection votes, bound pA from the disjoint estimation votes."""
    c_a = top_class(counts_selection)
    if c_a == OTHER:
        return CertifyResult(ABSTAIN, 0.0, 0.0)
    p_lower = lower_confidence_bound(counts_estimation.get(c_a, 0), n, alpha)
    if p_lower < 0.5:
        return CertifyResult(ABSTAIN, p_lower, 0.0)
    return CertifyResult(c_a, p_lower, radius(sigma, p_lower))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson upper bound on p from k successes in n trials."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k == n:
        return 1.0
    return float(beta.ppf(1 - alpha, k + 1, n - k))


def looks(n: int, first: int = 128, growth: float = 2.0) -> list[int]:
    """The fixed schedule of estimation sample sizes where adaptive certification may stop:
    first, first·growth, …, and n itself. Fixed in advance: it must not depend on the votes."""
    schedule, m = [], first
    while m < n:
        schedule.append(m)
        m = max(m + 1, round(m * growth))
    return [*schedule, n]


def p_needed(target_radius: float, sigma: float) -> float:
    """The pA lower bound that certifies radius R: Φ(R/σ) (1/2 for R = 0)."""
    return float(norm.cdf(target_radius / sigma))


def decided(k: int, m: int, alpha_look: float, p_target: float | None) -> bool:
    """Whether one look settles the question at level α_look. With a target, stop when pA's
    lower bound clears Φ(R/σ) (certified at R) or its upper bound falls below it (it never
    will be); without one, stop only when the upper bound is below 1/2 (nothing to certify)."""
    upper = upper_confidence_bound(k, m, alpha_look)
    if p_target is None:
        return upper < 0.5
    return upper < p_target or lower_confidence_bound(k, m, alpha_look) >= p_target


def predict(counts: Mapping[int, int], alpha: float) -> tuple[int, float]:
    """PREDICT: the top class if the two-sided binomial test on the top two counts rejects a
    tie at level α, else ABSTAIN. Returns (label, p-value)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if not ranked or ranked[0][0] == OTHER:
        return ABSTAIN, 1.0
    n_a = ranked[0][1]
    n_b = ranked[1][1] if len(ranked) > 1 else 0
    p_value = float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return (ranked[0][0] if p_value <= alpha else ABSTAIN), p_value


def check_sampling(*, n0: int, n: int, alpha: float) -> None:
    """Refuse sample sizes and levels the procedures are not defined for."""
    if n0 < 1:
        raise UsageError(f"--n0 must be >= 1, got {n0}")
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {alpha}")
