"""CERTIFY with early stopping (`Smoothed.certify_adaptive`): the votes looked at on a schedule
of sample sizes fixed in advance, and sampling stopped once the answer is known.

A run selects cA sequentially (`select`), then looks at the estimation votes (`estimate`) under
one of two bounds (`Schedule`): "union", Clopper–Pearson at α/K at each of K = ~11 looks a factor 2
apart, or "cs", the beta-binomial confidence sequence at α (stats.cs_lower_bound), valid at
every n at once, so looked at every ~10% more votes with no split of α. `conclude` turns the
last look into CERTIFY's answer. Why each is sound: docs/statistics.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import stats
from .votes import Tally

# The votes on the first `size` samples of a region; blocks answered at an earlier look of the
# same run are kept in the dict it is given, so that a look never asks them again.
Look = Callable[[int, dict[str, Any]], Awaitable[Tally]]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Looked:
    """Where a sequential run stopped: the counts at its last look, on `m` samples."""

    counts: dict[int, int]
    m: int  # samples looked at (0: none)
    sent: int  # of which sent now (the rest replayed)
    looks: int  # looks taken


@dataclass(frozen=True)
class Schedule:
    """The sizes where a run may stop, fixed before any vote, and pA's bound at each:
    `settled(k, m)` says the question is answered, `lower(k, m)` is the bound a look
    certifies with."""

    sizes: list[int]
    settled: Callable[[int, int], bool]
    lower: Callable[[float, int], float]

    @classmethod
    def of(cls, bound: str, n_max: int, alpha: float, p_target: float | None) -> Schedule:
        if bound == "cs":
            prior = stats.cs_prior(p_target)
            return cls(
                stats.looks(n_max, first=16, growth=1.1),
                lambda k, m: stats.cs_decided(k, m, alpha, p_target, prior),
                lambda k, m: stats.cs_lower_bound(k, m, alpha, prior),
            )
        schedule = stats.looks(n_max)
        alpha_look = alpha / len(schedule)
        return cls(
            schedule,
            lambda k, m: stats.decided(k, m, alpha_look, p_target),
            lambda k, m: stats.lower_confidence_bound(k, m, alpha_look),
        )


async def _looks(
    look: Look, sizes: list[int], progress: Progress | None, stop: Callable[[Tally, int], bool]
) -> Looked:
    """Look at the votes at each size in turn until `stop(tally, size)`."""
    memory: dict[str, Any] = {}
    counts: dict[int, int] = {}
    m = sent = taken = 0
    for size in sizes:
        tally = await look(size, memory)
        if progress:
            progress(size - m)
        counts, m, sent, taken = tally.counts, size, sent + tally.sent, taken + 1
        if stop(tally, size):
            break
    return Looked(counts, m, sent, taken)


async def select(look: Look, n0: int, progress: Progress | None) -> Looked:
    """CERTIFY's selection, looked at after 16, 32, 64, … and n0 samples: it stops once one
    class holds a clear majority (stats.selected). cA may be any function of the selection
    samples, and the estimation samples are a separate stream, so this costs no validity; an
    easy input spends 16 selection votes instead of n0."""
    sizes = stats.looks(n0, first=16)
    return await _looks(look, sizes, progress, lambda t, m: stats.selected(t.counts, m))


async def estimate(
    look: Look,
    c_a: int,
    schedule: Schedule,
    n_max: int,
    p_target: float | None,
    futility: bool,
    progress: Progress | None,
) -> Looked:
    """The estimation votes, looked at on the schedule until it settles pA against the
    target (or 1/2); with `futility` and a target, also once even an optimistic future could
    not certify it by n_max (stats.futile). No look at all when cA is OTHER."""

    def stop(tally: Tally, m: int) -> bool:
        k = tally.counts.get(c_a, 0)
        if schedule.settled(k, m):
            return True
        lower = schedule.lower
        return futility and p_target is not None and stats.futile(k, m, n_max, p_target, lower)

    sizes = schedule.sizes if c_a != stats.OTHER else []
    return await _looks(look, sizes, progress, stop)


def conclude(
    c_a: int,
    looked: Looked,
    schedule: Schedule,
    n_max: int,
    alpha: float,
    sigma: float,
    budget: bool,
) -> tuple[stats.CertifyResult, float]:
    """CERTIFY's answer from the last look, and the largest radius the run could certify."""
    k_a = looked.counts.get(c_a, 0)
    if budget and looked.m == n_max:
        # --budget: the last look's bound is Clopper–Pearson at α itself, not α/K. Early
        # stops only ever abstain (upper bound < 1/2), and an abstention is never a wrong
        # certificate. So a wrong certificate needs this run to reach the last look AND the
        # last bound to fail: P[wrong] ≤ P[last look's bound > pA] ≤ α, the failure event
        # needing no conditioning on how the run got here (the stopping rule changes which
        # runs arrive, never the probability of an event that contains the wrong ones).
        p_lower = stats.lower_confidence_bound(k_a, n_max, alpha)
        return stats.certify_lower(c_a, p_lower, sigma), stats.max_radius(sigma, n_max, alpha)
    p_lower = schedule.lower(k_a, looked.m) if looked.m else 0.0
    best = stats.radius(sigma, schedule.lower(n_max, n_max))
    return stats.certify_lower(c_a, p_lower, sigma), best
