"""Validation on the real black box: what a run keeps. Every epoch is asked about the same
noise draws of the held-out images, the zero-query start first, and replaces the kept state
only when it is more accurate under noise and no worse than the start at any consistency level
(`keeps`). Past what a few draws can see, the confirmation draws watch the images the start
answers right under every draw (`Confirmation`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..frontends import apply
from ..memory import release
from ..stats import paired_difference, wilson_interval
from .context import Context
from .distill import chunk_size
from .objectives import add_noise, confirmation_seed, generators

CONFIRM_CHUNK = 16  # confirmation draws per level: a candidate stops at the first level it loses
CONFIRM_IMAGES = 64  # the most held-out images the confirmation draws watch


async def validate(
    ctx: Context,
    seed: int,
    draws: int | None = None,
    images: torch.Tensor | None = None,
    frontend: nn.Module | None = None,
) -> torch.Tensor:
    """Whether the REAL black box answers each held-out image (or those in `images`) right
    under each of `draws` noise draws (`val_draws`) through `frontend` (the current one): a
    bool per (draw, image), draw-major. The same seed gives the same draws, so epochs compare
    pair by pair."""
    draws = draws or ctx.settings.val_draws
    x, t = ctx.x_val, ctx.t_val
    if images is not None:
        x, t = x[images], t[images]
    noise, _ = generators(seed, ctx.device)
    module = ctx.frontend if frontend is None else frontend
    # a chunk of (draw, image) pairs at a time, drawn in order from one generator: at 28×28 one
    # chunk, as before; at 320×320 held-out images × draws would otherwise be gigabytes
    pairs = torch.arange(len(x)).repeat(draws)
    labels, scored = [], True
    for chunk in pairs.split(chunk_size(x.shape, most=len(pairs))):
        noisy = add_noise(x[chunk.to(x.device)], ctx.settings.sigma, noise)
        with torch.no_grad():
            inputs = apply(module, noisy)
        answer = await ctx.ask(inputs)
        labels.append(torch.from_numpy(answer.labels))
        scored = scored and answer.scores is not None
    ctx.scored = scored
    release()
    return (torch.cat(labels).to(ctx.device) == t.repeat(draws)).cpu()


def consistency(correct: torch.Tensor, draws: int) -> list[float]:
    """The share of held-out images answered right in at least k of the `draws` noise draws,
    k = 1..draws: validation's view of the certified-accuracy curve, where more draws right
    stands for a larger radius (`correct` is draw-major, as `validate` returns it)."""
    right = correct.view(draws, -1).sum(0)
    return [float((right >= k).float().mean()) for k in range(1, draws + 1)]


def row(epoch: int, correct: torch.Tensor, start: torch.Tensor, draws: int) -> dict[str, Any]:
    """A validation row: noisy accuracy with its 95% interval, the paired difference from the
    start with its interval, the consistency levels."""
    accuracy, low, high = wilson_interval(correct.numpy())
    gain, gain_low, gain_high = paired_difference(correct.numpy(), start.numpy())
    return {
        "epoch": epoch,
        "noisy_accuracy": accuracy,
        "interval": [low, high],
        "vs_start": [gain, gain_low, gain_high],
        "consistency": consistency(correct, draws),
    }


def keeps(row: dict[str, Any], best_accuracy: float, start: list[float] | None) -> bool:
    """Whether a validated epoch may replace the kept state: more accurate under noise than it,
    and at no consistency level below the zero-query start. A state that gains on average
    while losing the images the start answered right under every draw would certify less at
    the largest radii: never worse than the start means at every radius, not on average.
    Ties keep the earlier, cheaper state."""
    if row["noisy_accuracy"] <= best_accuracy:
        return False
    return start is None or all(
        now >= before for now, before in zip(row["consistency"], start, strict=True)
    )


def sure_images(start_correct: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """The held-out images the start answered right under every validation draw: those it
    certifies at the largest radii (at most `CONFIRM_IMAGES`, chosen by the seed)."""
    sure = start_correct.view(draws, -1).all(0).nonzero().flatten()
    if len(sure) > CONFIRM_IMAGES:
        pick = torch.randperm(len(sure), generator=torch.Generator().manual_seed(seed))
        sure = sure[pick[:CONFIRM_IMAGES].sort().values]
    return sure


@dataclass(frozen=True)
class ConfirmationTally:
    """What the confirmation draws saw through one state, cumulative at each level: how many
    of the watched images stay right under every draw so far, and how many of their answers
    are wrong (images × draws so far)."""

    right: list[int]
    wrong: list[int]

    def holds(self, start: ConfirmationTally, level: int) -> bool:
        """No fewer images right under every draw than the start, and no more wrong answers
        among them, at `level`. The draws are the start's own (the same seed), so the two are
        compared answer by answer: an image whose pA falls from 0.995 to 0.95 is still right
        under 16 draws half the time, but it adds wrong answers."""
        return self.right[level] >= start.right[level] and self.wrong[level] <= start.wrong[level]


@dataclass
class Confirmation:
    """Four validation draws see radii up to about σ. The start's surest images get `draws`
    further draws, in levels of `CONFIRM_CHUNK`, tallied at each level (`ConfirmationTally`).
    A candidate is kept only if its tally holds against the start's at every level (right
    under 4 + 16 draws: pA of about 0.97 or more; 4 + 48: about 0.99, where 2σ is certified).
    The start is
    asked only when a first candidate needs the comparison, so a run that keeps its start
    spends nothing on it; a candidate stops at the first level it loses."""

    images: torch.Tensor  # indices into the held-out images
    draws: int
    active: bool = True  # False: switched off, nothing to watch, or the budget too small
    start: ConfirmationTally | None = None  # the start's, once asked
    spent: int = 0  # queries spent on confirmation

    @property
    def levels(self) -> list[int]:
        """Draws at each level."""
        full, last = divmod(self.draws, CONFIRM_CHUNK)
        return [CONFIRM_CHUNK] * full + ([last] if last else [])

    @property
    def cost(self) -> int:
        """Queries to confirm one state in full."""
        return len(self.images) * self.draws

    def reserve(self) -> int:
        """Queries to keep back: the start's confirmation (until asked) and one candidate's."""
        if not self.active:
            return 0
        return self.cost * (2 if self.start is None else 1)

    async def tally(
        self, ctx: Context, frontend: nn.Module, need: ConfirmationTally | None = None
    ) -> ConfirmationTally:
        """The tally through `frontend`, stopping at the first level where it does not hold
        against `need`."""
        right = torch.ones(len(self.images), dtype=torch.bool)
        out = ConfirmationTally([], [])
        for level, draws in enumerate(self.levels):
            seed = confirmation_seed(ctx.settings.seed) + level
            correct = await validate(ctx, seed, draws, self.images, frontend)
            self.spent += len(self.images) * draws
            right &= correct.view(draws, -1).all(0)
            wrong = (out.wrong[-1] if out.wrong else 0) + int((~correct).sum())
            out = ConfirmationTally([*out.right, int(right.sum())], [*out.wrong, wrong])
            if need is not None and not out.holds(need, level):
                break
        return out

    async def passes(
        self, ctx: Context, start: nn.Module, candidate: nn.Module
    ) -> ConfirmationTally:
        """The candidate's tally (shorter than the start's where it lost a level); asks the
        start first if it has not been asked yet."""
        if self.start is None:
            self.start = await self.tally(ctx, start)
        return await self.tally(ctx, candidate, self.start)

    def kept(self, tally: ConfirmationTally) -> bool:
        assert self.start is not None
        return len(tally.right) == len(self.start.right) and all(
            tally.holds(self.start, level) for level in range(len(tally.right))
        )

    def record(self) -> dict[str, Any]:
        """What frontend.json keeps (and resuming reads back with `from_record`)."""
        return {
            "draws": self.draws,
            "images": len(self.images),
            "active": self.active,
            "start": None if self.start is None else self.start.right,
            "start_wrong": None if self.start is None else self.start.wrong,
            "queries": self.spent,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], images: torch.Tensor) -> Confirmation:
        start = None  # not asked yet (or, migrated from an older run, to be asked again)
        if record["start"] is not None:
            start = ConfirmationTally(record["start"], record["start_wrong"])
        return cls(images, record["draws"], record["active"], start, record["queries"])
