"""The zero-query start of a new run: its front end's config, and the front end itself,
from `--start RUN` or pre-trained by MSE on the images alone, with its LoRA or output head."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import memory
from ..blackbox import BlackBox
from ..digests import module_digest
from ..errors import UsageError
from ..frontends import FrontEndConfig, TrainingRecord, build, from_pretrained, read_record
from ..frontends.record import StartRecord
from ..progress import Progress
from .context import TrainSettings
from .objectives import PRETRAIN_BATCH, pretrain_mse


def new_config(
    settings: TrainSettings, blackbox: BlackBox, shape: tuple[int, ...]
) -> FrontEndConfig:
    """What the new run's front end is."""
    c, h, w = shape
    # SPSA's unit on a denoiser or coordinator: its few-parameter output head, unless the
    # user asked for a LoRA; distill's too, for its head stage
    head = (
        (settings.method == "spsa" or (settings.method == "distill" and settings.head_stage))
        and settings.objective != "mse"
        and settings.frontend != "prompt"
        and not settings.lora_rank
    )
    return FrontEndConfig(
        kind=settings.frontend,
        channels=c,
        height=h,
        width=w,
        sigma=settings.sigma,
        prompt_width=settings.prompt_width,
        lora_rank=settings.lora_rank,
        head=head,
        blackbox=blackbox.fingerprint,
        blackbox_description=blackbox.description,
        method=None if settings.objective == "mse" else settings.method,
        objective=settings.objective,
    )


def begin(
    config: FrontEndConfig,
    record: TrainingRecord,
    settings: TrainSettings,
    x_train: torch.Tensor,
    device: torch.device,
    log: Callable[[str], None],
    progress: Progress,
) -> nn.Module:
    """The body from --start or pre-trained by MSE (noted in `record`), then its LoRA or head."""
    base_config = FrontEndConfig(**{**config.__dict__, "lora_rank": 0, "head": False})
    base = build(base_config, seed=settings.seed).to(device)
    if settings.start is not None:
        load_start(base, config, record, settings.start, device)
        log(f"starting from {settings.start}'s front end (no pre-training, no queries)")
    elif settings.frontend != "prompt" and settings.pretrain_epochs > 0:
        log(
            f"pre-training the {settings.frontend} to remove the noise (MSE, no queries): "
            f"{settings.pretrain_epochs} epochs over {len(x_train)} images"
        )
        steps = settings.pretrain_epochs * math.ceil(len(x_train) / PRETRAIN_BATCH)
        with progress("pre-train", steps, "batch") as advance:
            record.mse_pretrain_loss = pretrain_mse(
                base, x_train, settings.sigma, settings.pretrain_epochs, settings.seed,
                PRETRAIN_BATCH, advance=advance,
            )  # fmt: skip
        memory.release()
    if not (config.lora_rank or config.head):
        return base
    frontend = build(config, base_state=base.state_dict(), seed=settings.seed).to(device)
    train_only([frontend], config, settings, record)
    return frontend


def train_only(
    modules: list[nn.Module],
    config: FrontEndConfig,
    settings: TrainSettings,
    record: TrainingRecord,
) -> None:
    """With an output head, which part trains: the head (spsa, and distill's head stage), or
    the body (distill before its head stage). The flags also set what the checkpoint counts as
    trainable parameters."""
    if not config.head:
        return
    head_trains = settings.method != "distill" or record.head_stage_from is not None
    for module in modules:
        module.train_only("head" if head_trains else "body")  # type: ignore[operator]


def load_start(
    base: nn.Module, config: FrontEndConfig, record: TrainingRecord, run: Path, device: torch.device
) -> None:
    """Load `--start RUN`'s front end into `base`, this run's body; record it (its digest, its
    MSE loss) in `record`. Refused unless it is the same front end: kind, image size and σ, and
    a plain one (no LoRA, no output head), whose weights the body takes as they are."""
    module, started, _ = from_pretrained(run, device)
    shape = (config.channels, config.height, config.width)
    theirs = (started.channels, started.height, started.width)
    differ = [
        f"{what} {old} (this run: {new})"
        for what, old, new, same in [
            ("front end", started.kind, config.kind, started.kind == config.kind),
            ("σ", started.sigma, config.sigma, math.isclose(started.sigma, config.sigma)),
            ("image size", "×".join(map(str, theirs)), "×".join(map(str, shape)), theirs == shape),
        ]
        if not same
    ]
    if started.lora_rank or started.head:
        differ.append(f"it has {'a LoRA' if started.lora_rank else 'an output head'}")
    if differ:
        raise UsageError(
            f"--start {run} cannot start this run: {'; '.join(differ)}; start from a "
            f"`bbsmooth train --objective mse --frontend {config.kind}` run at this σ and size"
        )
    base.load_state_dict(module.state_dict())
    record.start = StartRecord(module_digest(module), started.method or "mse")
    record.mse_pretrain_loss = read_record(run).mse_pretrain_loss
