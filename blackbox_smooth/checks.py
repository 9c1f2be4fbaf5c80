"""The values the procedures are defined for, as pure checks: σ, the sample sizes, α, the
adaptive target and bound.

Below the core and the CLI alike (it imports only the errors), so that a value is refused where
it enters: the CLI's options when it reads them, `Smoothed` and `lora` when a script hands them
in. The statistics keep their own preconditions (ValueError): they are functions of any caller.
"""

from __future__ import annotations

import math

from .errors import UsageError


def check_sigma(sigma: float) -> None:
    """σ must be a finite positive number: σ = ∞ would "certify" every radius."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise UsageError(f"--sigma must be a finite number > 0, got {sigma}")


def check_sampling(*, n0: int, n: int, alpha: float) -> None:
    """Refuse sample sizes and levels the procedures are not defined for."""
    if n0 < 1:
        raise UsageError(f"--n0 must be >= 1, got {n0}")
    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {alpha}")


def check_adaptive(target_radius: float | None, bound: str) -> None:
    """Refuse a target radius or a bound adaptive certification is not defined for: a NaN
    radius fails every comparison, so such a run would never stop nor certify its target."""
    if target_radius is not None and not 0 <= target_radius < math.inf:  # NaN too
        raise UsageError(f"--target-radius must be a finite number >= 0, got {target_radius}")
    if bound not in ("union", "cs"):
        raise UsageError(f"--bound must be union or cs, got {bound!r}")
