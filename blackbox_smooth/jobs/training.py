"""The train jobs: a front end before the black box from its answers alone (training/), or a
LoRA adapter inside a local model (lora.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..adapters.local import TorchModel
from ..data import Fit, load_folder, parse_size
from ..endpoint import Kind
from ..errors import UsageError
from ..lora import LoraRun, train_classifier
from ..options import ImageOptions, LoraSettings, SmoothingOptions, TrainSettings
from ..progress import Progress, no_progress
from ..runfolder import FRONTEND, LORA, claim
from ..smooth import resolve_device
from ..training import train as train_frontend
from ..training.loop import TrainResult
from .assembly import files_read, open_smoothed, run_then_close


def train(
    options: SmoothingOptions,
    settings: TrainSettings,
    data: Path,
    out: Path,
    imaging: ImageOptions = ImageOptions(),
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: Progress = no_progress,
) -> TrainResult:
    """Learn a front end before the black box from its answers alone; write the run `out`.
    The black box, cache and device are those certify uses; `settings.max_queries` is the
    budget (`options.max_queries` is not used)."""
    if not math.isclose(settings.sigma, options.sigma):
        raise UsageError(f"σ differs: {settings.sigma} to train, {options.sigma} to smooth")
    claim(out, FRONTEND, [data, settings.start, *files_read(options)])
    x, labels, _ = load_folder(data, parse_size(imaging.size), imaging.grayscale, Fit.of(imaging))
    settings.check(labelled=labels is not None)
    smoothed = open_smoothed(replace(options, max_queries=None))
    return run_then_close(
        smoothed,
        lambda: train_frontend(
            smoothed.blackbox,
            x,
            labels,
            settings,
            out,
            cache=smoothed.cache,
            resume=resume,
            device=smoothed.device,  # type: ignore[arg-type]
            concurrency=options.wire.concurrency,
            log=log,
            progress=progress,
        ),
    )


def train_lora(
    options: SmoothingOptions,
    settings: LoraSettings,
    data: Path,
    out: Path,
    imaging: ImageOptions = ImageOptions(),
    *,
    log: Callable[[str], None] = print,
) -> LoraRun:
    """LoRA inside a local classifier (PEFTSmoothing's white-box method); write the run `out`."""
    if options.endpoint.kind != Kind.torch_function:
        raise UsageError(
            "--method lora trains inside a local model: give --endpoint torch:FILE.py:FUNC "
            "(a function returning the torch.nn.Module; peft cannot wrap TorchScript)"
        )
    claim(out, LORA, [data, *files_read(options)])
    x, labels, _ = load_folder(data, parse_size(imaging.size), imaging.grayscale, Fit.of(imaging))
    device = resolve_device(options.device)
    base = TorchModel.from_function(options.endpoint.target, device)
    _, run = train_classifier(
        base.model,
        x,
        labels,
        sigma=settings.sigma,
        rank=settings.rank,
        targets=settings.target_list,
        objective=settings.objective,
        epochs=settings.epochs,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        out=out,
        device=device,
        log=log,
    )
    return run
