"""Timing that a busy moment cannot flip: the rows being compared run in turn, round after
round, and a ratio is the median of its per-round ratios, printed with its spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(rows: dict[str, Callable[[], None]], rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per run of each row: every round runs each row once, in turn."""
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def speed_ratio(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """How many times faster `ours` ran than `theirs` (their seconds ÷ ours), per round:
    (median, lowest, highest)."""
    ratios = [t / o for o, t in zip(ours, theirs, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread(ratio: tuple[float, float, float]) -> str:
    median, low, high = ratio
    return f"{median:.2f} ({low:.2f}–{high:.2f})"
