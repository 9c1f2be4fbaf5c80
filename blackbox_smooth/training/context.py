"""What every training method works with: the settings, the context a method is handed, the
`Method` interface, and the held-out split. The loop (loop.py) and the methods (distill.py,
spsa.py, whitebox.py) import this module; it imports neither, so the flow is one way:
loop → methods → context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..blackbox import Answer, BlackBox
from ..errors import UsageError
from ..stats import check_sigma
from ..votes import Votes

CPU = torch.device("cpu")
METHODS = ("distill", "spsa", "whitebox")
OBJECTIVES = ("stability", "classification", "mse")


@dataclass(frozen=True)
class TrainSettings:
    sigma: float
    frontend: str = "denoiser"
    method: str = "distill"
    objective: str = "stability"
    epochs: int = 5
    max_queries: int | None = 20_000
    lora_rank: int = 0
    prompt_width: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-4
    pretrain_epochs: int = 30  # MSE, no queries (denoiser and coordinator)
    passes: int = 10  # passes over the training images per epoch (distill, whitebox)

    def check(self, labelled: bool) -> None:
        check_sigma(self.sigma)
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}: use {', '.join(METHODS)}")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown --objective {self.objective!r}: use {', '.join(OBJECTIVES)}")
        if self.objective == "classification" and not labelled:
            raise UsageError(
                "--objective classification needs labelled data: one sub-folder per class in "
                "--data (or use --objective stability, which needs no labels)"
            )
        if self.objective == "mse" and self.frontend == "prompt":
            raise UsageError("--objective mse pre-trains a denoiser or coordinator, not a prompt")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lora_rank < 0:
            raise UsageError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.max_queries is not None and self.max_queries < 0:
            raise UsageError(f"--max-queries must be >= 0, got {self.max_queries}")


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
    log: Callable[[str], None] = print

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
