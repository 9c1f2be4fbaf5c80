"""What `bbsmooth train` learns and how: a front end before the black box (`TrainSettings`)
or a LoRA adapter inside a local model (`LoraSettings`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..checks import check_sigma
from ..errors import UsageError
from ..kinds import KINDS
from .fields import at_least, option

METHODS = ("distill", "spsa", "whitebox")  # black-box training methods (training/)
OBJECTIVES = ("stability", "classification", "mse")


@dataclass(frozen=True)
class TrainSettings:
    """How `bbsmooth train` learns a front end (training/)."""

    sigma: float = option(math.nan, "Noise level σ, on the [0,1] pixel scale.", required=True)
    frontend: str = option("denoiser", "prompt | denoiser | coordinator")
    method: str = option("distill", "distill | spsa | whitebox | lora")
    objective: str = option("stability", "stability | classification | mse")
    epochs: int = option(5, "Epochs, each validated on the real black box.")
    max_queries: int | None = option(20_000, "Never send more than this many queries.")
    lora_rank: int = option(
        0,
        "Rank of the LoRA (peft) this run trains: on the front end (0: none) or, with "
        "--method lora, inside the model (default 8).",
    )
    prompt_width: int = option(0, "prompt: frame width (0: full image).")
    val_fraction: float = option(0.1, "Held-out share for validation.")
    val_draws: int = option(4, "Noise draws per held-out image at each validation.")
    confirm_draws: int = option(
        16,
        "Further draws on the held-out images the start answers right under every draw: an "
        "epoch is kept only if as many stay right under all of them, level by level of 16 "
        "(0: off).",
    )
    patience: int = option(
        2, "Stop when validation has not improved for this many epochs (0: never)."
    )
    head_stage: bool = option(
        True,
        "distill on a denoiser or coordinator: once validation stops improving, train an output "
        "head by SPSA on the queries left (needs class scores).",
        flags=("--head-stage/--no-head-stage",),
    )
    seed: int = option(0, "Noise seed: the same seed gives the same counts.")
    batch_size: int = option(64, "Images per optimiser step.", cli=False)
    lr: float = option(3e-4, "Learning rate.", cli=False)
    pretrain_epochs: int = option(30, "MSE pre-training epochs (no queries).")
    start: Path | None = option(
        None,
        "Start from this run's front end instead of pre-training one (an --objective mse run "
        "of the same front end, image size and σ): several methods, one pre-training.",
    )
    passes: int = option(10, "Passes over the images per epoch (distill, whitebox).", cli=False)
    force: bool = option(
        False,
        "Train even when the held-out images cannot tell a better epoch from the start (too "
        "few, or all right from the start): a warning instead of a refusal.",
    )

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if self.frontend not in KINDS:
            raise UsageError(f"unknown --frontend {self.frontend!r}: use {', '.join(KINDS)}")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}: use {', '.join(METHODS)} or lora")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown --objective {self.objective!r}: use {', '.join(OBJECTIVES)}")
        if self.objective == "mse" and self.frontend == "prompt":
            raise UsageError("--objective mse pre-trains a denoiser or coordinator, not a prompt")
        if self.start is not None and self.frontend == "prompt":
            raise UsageError("--start gives a pre-trained front end; a prompt starts at zero")
        if self.start is not None and self.objective == "mse":
            raise UsageError("--start with --objective mse would only copy the start: drop one")
        at_least("--epochs", self.epochs, 1)
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        at_least("--lora-rank", self.lora_rank, 0)
        at_least("--max-queries", self.max_queries, 0)
        at_least("--val-draws", self.val_draws, 1)
        at_least("--confirm-draws", self.confirm_draws, 0)
        at_least("--patience", self.patience, 0)

    def check(self, labelled: bool) -> None:
        """What depends on the data: the classification objective needs labels."""
        if self.objective == "classification" and not labelled:
            raise UsageError(
                "--objective classification needs labelled data: one sub-folder per class in "
                "--data (or use --objective stability, which needs no labels)"
            )


@dataclass(frozen=True)
class LoraSettings:
    """`train --method lora`: LoRA inside a local classifier (PEFTSmoothing's white-box way)."""

    sigma: float = option(math.nan, "Noise level σ, on the [0,1] pixel scale.", required=True)
    rank: int = option(8, "LoRA rank.", flags=("--lora-rank",))
    targets: str | None = option(
        None, "--method lora: comma-separated layer names.", flags=("--lora-targets",)
    )
    objective: str = option("stability", "stability | classification")
    epochs: int = option(5, "Epochs.")
    val_fraction: float = option(0.1, "Held-out share for validation.")
    seed: int = option(0, "Seed of the split and the noise.")

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if self.rank < 1:
            raise UsageError(f"--lora-rank must be >= 1 for --method lora, got {self.rank}")

    @property
    def target_list(self) -> list[str] | None:
        return self.targets.split(",") if self.targets else None
