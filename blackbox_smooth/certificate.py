"""What the smoothed classifier answers: a `Certificate` (CERTIFY) or a `Prediction` (PREDICT),
and their JSON, where vote counts are keyed by class as text and OTHER is "-1"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .blackbox import label_out
from .digests import fingerprint


def counts_out(counts: Mapping[int, int]) -> dict[str, int]:
    """Vote counts as files and clients read them: {"3": 90, "-1": 10} (OTHER as -1)."""
    return {str(label_out(k)): v for k, v in counts.items()}


def said(
    label: int, radius: float | None, votes: Sequence[Mapping[str, int] | None]
) -> dict[str, Any]:
    """What the evidence ledger records of an outcome: its label, its radius, and a digest of
    its votes (as files read them)."""
    return {
        "label": label,
        "radius": None if radius is None else round(radius, 6),
        "votes": fingerprint(votes)[:16],
    }


@dataclass(frozen=True)
class Certificate:
    label: int  # -1 when abstaining
    abstain: bool
    radius: float  # l2, [0,1]-pixel units, at the noise's resolution; 0 when abstaining
    p_lower: float
    n0: int
    n: int
    alpha: float
    sigma: float
    seed: int
    counts: dict[int, int]  # votes in the n estimation samples (OTHER among them)
    counts_selection: dict[int, int]
    max_radius: float  # the largest radius (n, α) could certify: n is the limit when near it
    queries_sent: int
    queries_cached: int
    seconds: float
    mode: str = "fixed"  # fixed | target (--target-radius) | budget (--budget)
    n_max: int = 0  # adaptive: the most estimation samples it could have used (n: those used)
    schedule_looks: int = 0  # adaptive: the looks taken of the schedule's K (union: at α/K)
    # the bound on pA: "cp" (Clopper–Pearson at α, fixed n); adaptive: "union" (Clopper–Pearson
    # at α/K at each look) or "cs" (a confidence sequence at α, valid at every n); with --budget
    # the last look's certificate is Clopper–Pearson at α either way
    bound: str = "cp"
    # The evidence ledger (ledger.py): False when this image was already looked at under this
    # model by another attempt, so that this one may have been chosen after looking; `looks`
    # counts the attempts up to this one and `alpha_effective` is α under a union bound over them
    fresh: bool = True
    looks: int = 1
    alpha_effective: float = 0.0
    reused: str | None = None  # the first attempt, in words, when not fresh

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = counts_out(self.counts)
        d["counts_selection"] = counts_out(self.counts_selection)
        return d

    def said(self) -> dict[str, Any]:
        votes = [counts_out(self.counts), counts_out(self.counts_selection)]
        return said(self.label, self.radius, votes)


@dataclass(frozen=True)
class Prediction:
    label: int  # -1 when abstaining
    abstain: bool
    p_value: float
    n: int
    alpha: float
    sigma: float
    seed: int
    counts: dict[int, int]
    queries_sent: int
    queries_cached: int
    seconds: float
    fresh: bool = True  # as a certificate's: the first look at this image under this model
    looks: int = 1
    alpha_effective: float = 0.0
    reused: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["counts"] = counts_out(self.counts)
        return d

    def said(self) -> dict[str, Any]:
        return said(self.label, None, [counts_out(self.counts), None])
