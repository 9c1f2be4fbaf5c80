"""What every training method works with: the context a method is handed (its settings are
declared in options/), the `Method` interface, and the held-out split. The loop (loop.py)
and the methods (distill.py, spsa.py, whitebox.py) import this module; it imports neither, so
the flow is one way: loop → methods → context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..blackbox import Answer, BlackBox
from ..options import TrainSettings
from ..progress import Progress, no_progress
from ..votes import Votes

CPU = torch.device("cpu")


@dataclass
class Context:
    """What a method works with."""

    settings: TrainSettings
    frontend: nn.Module
    blackbox: BlackBox
    votes: Votes
    device: torch.device
    x_train: torch.Tensor
    t_train: torch.Tensor  # target class per training image
    x_val: torch.Tensor
    t_val: torch.Tensor
    num_classes: int  # the black box's classes + 1 for OTHER
    reserved: int = 0  # queries kept back for the remaining validations
    scored: bool = False  # whether the last validation's answers carried class scores
    log: Callable[[str], None] = print
    progress: Progress = no_progress  # for steps that send no queries (the bar counts those)

    def spendable(self) -> int:
        """Queries a method may still send (validation's share kept back)."""
        left = self.votes.budget.left
        return 10**12 if left is None else max(0, left - self.reserved)

    async def ask(self, inputs: torch.Tensor) -> Answer:
        return await self.votes.ask(inputs)


class Method(Protocol):
    def __init__(self, ctx: Context) -> None: ...

    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a fixed share held out, chosen by the seed."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
