"""The values the procedures are defined for, as pure checks: σ, the sample sizes, α.

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
