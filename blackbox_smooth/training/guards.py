"""What a run refuses (with --force, warns about) before it spends queries: a held-out
split too small to tell an epoch from the start, a start that validation cannot improve on, a
`--resume` with other settings (start.py refuses a `--start` run of another front end)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from ..blackbox import BlackBox, differences
from ..digests import module_digest
from ..errors import StaleRun, UsageError
from ..frontends import FrontEndConfig, TrainingRecord, from_pretrained
from .context import TrainSettings

MIN_HELD_OUT = 10  # fewer cannot tell an epoch from the start (at 4 draws: 40 answers)


def check_held_out(
    held_out: int, n: int, settings: TrainSettings, log: Callable[[str], None]
) -> None:
    """Before the first query: refuse (with --force, warn) a held-out split too small to tell
    a better epoch from the start, saying how many images would do."""
    if held_out >= MIN_HELD_OUT:
        return
    need = math.ceil(MIN_HELD_OUT / settings.val_fraction)
    fraction = MIN_HELD_OUT / n
    other = f", or --val-fraction {fraction:.2g}" if fraction <= 0.5 else ""
    message = (
        f"--data has {n} images, so --val-fraction {settings.val_fraction:g} holds out "
        f"{held_out}: too few to tell a better epoch from the start (every query after the "
        f"first validation would be spent in vain); hold out at least {MIN_HELD_OUT}: "
        f"{need:,} images in --data{other}"
    )
    if not settings.force:
        raise UsageError(message + "; or pass --force to train anyway")
    log(f"warning: {message}; training anyway (--force)")


def all_right_from_the_start(
    held_out: int, draws: int, out: Path, settings: TrainSettings, log: Callable[[str], None]
) -> None:
    """The start answers every held-out image right under every draw: no epoch can validate
    better, so the queries of the epochs would buy nothing. Refuse (with --force, warn); the
    run holds the validated start, which certifies as it is."""
    message = (
        f"the zero-query start already answers all {held_out} held-out images right under all "
        f"{draws} noise draws: no epoch can validate better, so training would spend its "
        f"queries in vain. {out} holds the start (certify with it as it is); to train, hold out "
        "images it gets wrong under noise: more images, a larger --val-fraction or --val-draws"
    )
    if not settings.force:
        raise UsageError(message + "; or go on anyway: --resume --force")
    log(f"warning: {message}; training anyway (--force)")


def check_resume(
    config: FrontEndConfig,
    record: TrainingRecord,
    settings: TrainSettings,
    blackbox: BlackBox,
    shape: tuple[int, ...],
) -> None:
    """Resume only the run that was started: name each setting that differs."""
    size = (config.channels, config.height, config.width)
    # validation's draws decide what is kept: a run compares its epochs under the same draws
    val_draws = record.validation_draws or settings.val_draws  # None: nothing validated yet
    confirmation = record.confirmation
    confirm_draws = settings.confirm_draws if confirmation is None else confirmation["draws"]
    differ = [
        f"{what} {old} (now {new})"
        for what, old, new, same in [
            ("front end", config.kind, settings.frontend, config.kind == settings.frontend),
            ("method", config.method, settings.method, config.method in (None, settings.method)),
            ("σ", config.sigma, settings.sigma, math.isclose(config.sigma, settings.sigma)),
            (
                "LoRA rank",
                config.lora_rank,
                settings.lora_rank,
                config.lora_rank == settings.lora_rank,
            ),
            (
                "objective",
                config.objective,
                settings.objective,
                config.objective == settings.objective,
            ),
            ("image size", "×".join(map(str, size)), "×".join(map(str, shape)), size == shape),
            ("--val-draws", val_draws, settings.val_draws, val_draws == settings.val_draws),
            (
                "--confirm-draws",
                confirm_draws,
                settings.confirm_draws,
                confirm_draws == settings.confirm_draws,
            ),
        ]  # fmt: skip
        if not same
    ]
    if config.blackbox != blackbox.fingerprint:
        how = differences(config.blackbox_description, blackbox.description)
        differ.append(f"black box ({how})" if how else "black box")
        differ.append("(the same model at a new address: pass --endpoint-id with the old one)")
    if differ:
        raise StaleRun(
            f"--resume: the run was made with other settings: {'; '.join(differ)}; resume "
            "with the same ones or use a new --out"
        )
    if settings.start is not None:
        kept = None if record.start is None else record.start.weights
        if kept != module_digest(from_pretrained(settings.start)[0]):
            raise StaleRun(
                f"--resume: the run did not start from --start {settings.start}'s front end; "
                "resume without --start, or use a new --out"
            )
