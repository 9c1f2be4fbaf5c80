"""The loop every method shares: split, targets, MSE pre-training, epochs with validation on
the real black box, a checkpoint per epoch, resume, and the query budget."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import memory
from ..blackbox import BlackBox, differences
from ..cache import BlockCache
from ..digests import module_digest
from ..errors import StaleRun, UsageError
from ..frontends import FrontEndConfig, build, from_pretrained, save_pretrained
from ..progress import Progress, progress_bar
from ..runfolder import FRONTEND, recover, settings_file
from ..votes import Budget, Votes
from .context import CPU, Context, Method, TrainSettings, split
from .distill import Distill
from .objectives import PRETRAIN_BATCH, deterministic, pretrain_mse, validation_seed
from .spsa import MINIBATCH, Spsa
from .validation import Confirmation, consistency, keeps, row, sure_images, validate
from .whitebox import Whitebox

HEAD_FROM = "head_stage_from"  # config.extra: the epoch after which distill's head stage began


def _method(name: str) -> type[Method]:
    methods: dict[str, type[Method]] = {"distill": Distill, "spsa": Spsa, "whitebox": Whitebox}
    return methods[name]


@dataclass
class TrainResult:
    config: FrontEndConfig
    frontend: nn.Module
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    sent: int = 0  # queries this call sent; config.queries also counts cached answers it used


@deterministic
async def train(
    blackbox: BlackBox,
    x: np.ndarray,
    labels: np.ndarray | None,
    settings: TrainSettings,
    out: str | Path,
    *,
    cache: BlockCache | None = None,
    resume: bool = False,
    device: torch.device = CPU,
    concurrency: int = 16,
    log: Callable[[str], None] = print,
    progress: Progress = progress_bar,
) -> TrainResult:
    """Train a front end before `blackbox` on images `x` (N×C×H×W in [0,1]); write `out`."""
    start = time.perf_counter()
    settings.check(labelled=labels is not None)
    out = Path(out)
    recover(out)
    if settings_file(out, FRONTEND).exists() and not resume:
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or a new --out")
    n, c, h, w = x.shape
    train_idx, val_idx = split(n, settings.val_fraction, settings.seed)
    if len(train_idx) < 2:
        raise UsageError(f"--data has {n} images: too few to train and validate on")
    if settings.objective != "mse" and not resume:
        _check_held_out(len(val_idx), n, settings, log)
    xt = torch.from_numpy(x).to(device, torch.float32)
    x_train, x_val = xt[train_idx], xt[val_idx]  # copied once (pre-training uses the same)

    extra: dict[str, torch.Tensor] = {}
    if resume and settings_file(out, FRONTEND).exists():
        best, config, extra = from_pretrained(out, device)
        _check_resume(config, settings, blackbox, (c, h, w))
        if settings.start is not None:
            kept = (config.extra.get("start") or {}).get("weights")
            if kept != module_digest(from_pretrained(settings.start)[0]):
                raise StaleRun(
                    f"--resume: the run did not start from --start {settings.start}'s front end; "
                    "resume without --start, or use a new --out"
                )
        frontend = copy.deepcopy(best)  # the state training goes on from; `best` is what certifies
        current = {k[len("current.") :]: v for k, v in extra.items() if k.startswith("current.")}
        if current:
            frontend.load_state_dict(current)
        _train_only([frontend, best], config, settings)
        log(f"resuming {out} after epoch {config.epochs_done} ({config.queries:,} queries so far)")
    else:
        config = FrontEndConfig(
            kind=settings.frontend,
            channels=c,
            height=h,
            width=w,
            sigma=settings.sigma,
            prompt_width=settings.prompt_width,
            lora_rank=settings.lora_rank,
            # SPSA's unit on a denoiser or coordinator: its few-parameter output head, unless
            # the user asked for a LoRA; distill's too, for its head stage
            head=(
                (
                    settings.method == "spsa"
                    or (settings.method == "distill" and settings.head_stage)
                )
                and settings.objective != "mse"
                and settings.frontend != "prompt"
                and not settings.lora_rank
            ),
            blackbox=blackbox.fingerprint,
            blackbox_description=blackbox.description,
            method=None if settings.objective == "mse" else settings.method,
            objective=settings.objective,
        )
        base_config = FrontEndConfig(**{**config.__dict__, "lora_rank": 0, "head": False})
        base = build(base_config, seed=settings.seed).to(device)
        if settings.start is not None:
            _load_start(base, config, settings.start, device)
            log(f"starting from {settings.start}'s front end (no pre-training, no queries)")
        elif settings.frontend != "prompt" and settings.pretrain_epochs > 0:
            log(
                f"pre-training the {settings.frontend} to remove the noise (MSE, no queries): "
                f"{settings.pretrain_epochs} epochs over {len(train_idx)} images"
            )
            steps = settings.pretrain_epochs * math.ceil(len(train_idx) / PRETRAIN_BATCH)
            with progress("pre-train", steps, "batch") as advance:
                loss = pretrain_mse(base, x_train, settings.sigma, settings.pretrain_epochs,
                                    settings.seed, PRETRAIN_BATCH, advance=advance)  # fmt: skip
            config.extra["mse_pretrain_loss"] = loss
            memory.release()
        frontend = base
        if config.lora_rank or config.head:
            frontend = build(config, base_state=base.state_dict(), seed=settings.seed).to(device)
            _train_only([frontend], config, settings)
        best = copy.deepcopy(frontend)
        save_pretrained(frontend, config, out)
    if settings.objective == "mse":
        config.extra["note"] = "MSE pre-training only: no queries"
        save_pretrained(frontend, config, out)
        return TrainResult(config, frontend, time.perf_counter() - start)

    budget = Budget(None if settings.max_queries is None else settings.max_queries - config.queries)
    votes = Votes(blackbox, cache, concurrency, budget, charge_cached=True)
    queries_before = config.queries
    # One bar (in a log, a line every few seconds) for the whole run after pre-training: queries
    # as they are answered, the budget its end; the steps inside it add their own.
    with progress(f"train {settings.method}", votes.budget.left, "q") as advance:
        votes.on_asked = advance

        # Targets: the black box's own answer on the clean image (stability), or the true label.
        if "targets" in extra:
            targets = extra["targets"].to(device)
        elif settings.objective == "stability":
            targets = torch.from_numpy((await votes.ask(xt)).labels).to(device)
            memory.release()
        else:
            assert labels is not None
            targets = torch.from_numpy(labels).to(device)
        num_classes = int(max(int(targets.max()), 0) + 2)  # + OTHER
        epochs_left = settings.epochs - config.epochs_done
        draws = settings.val_draws
        per_validation = len(val_idx) * draws
        validations = epochs_left + (0 if config.validation else 1)  # the start's too
        if budget.left is not None and budget.left < validations * per_validation:
            raise UsageError(
                f"--max-queries {settings.max_queries} does not cover validation alone "
                f"({validations} × {per_validation:,} queries): raise it, or lower --epochs, "
                "--val-draws or --val-fraction"
            )
        ctx = Context(
            settings=settings,
            frontend=frontend,
            blackbox=blackbox,
            votes=votes,
            device=device,
            x_train=x_train,
            t_train=targets[train_idx],
            x_val=x_val,
            t_val=targets[val_idx],
            num_classes=num_classes,
            reserved=epochs_left * per_validation,
            log=log,
            progress=progress,
        )
        method: Method = Spsa(ctx) if HEAD_FROM in config.extra else _method(settings.method)(ctx)
        if extra:
            method.load_state({k: v.to(device) for k, v in extra.items() if k != "targets"})

        def checkpoint() -> None:
            """The best validated front end (what certify loads), and what resuming needs: the
            current one, the method's state, the start's validation answers."""
            current = {f"current.{k}": v for k, v in frontend.state_dict().items()}
            state = {"validation.start": start_correct.to(torch.uint8), **current}
            save_pretrained(best, config, out, targets=targets, **state, **method.state())

        if not config.validation:  # the zero-query start, validated like every epoch after it
            share = validations * per_validation
            cap = settings.max_queries
            of_cap = f" of the {cap:,} ({share / cap:.0%})" if cap else ""
            log(
                f"validation on the black box: {len(val_idx)} held-out images × "
                f"{settings.val_draws} noise draws = {per_validation:,} queries each time, "
                f"{share:,} in all{of_cap}"
            )
            start_correct = await validate(ctx, validation_seed(settings.seed))
            config.extra["scored"] = ctx.scored
            config.queries = queries_before + votes.budget.reserved
            config.validation.append(
                {**row(0, start_correct, start_correct, draws), "queries": config.queries}
            )
            config.extra["best_epoch"] = 0
            checkpoint()
            if bool(start_correct.all()):
                _all_right_from_the_start(len(val_idx), draws, out, settings, log)
        elif "validation.start" in extra and extra["validation.start"].numel():
            start_correct = extra["validation.start"].bool()
        elif config.epochs_done < settings.epochs:
            raise UsageError(
                f"{out} was trained by an older bbsmooth that kept no validation of its start: "
                "train again with a new --out"
            )
        else:  # an older run, already finished: nothing left to validate against
            start_correct = torch.zeros(0, dtype=torch.bool)
        start_levels = consistency(start_correct, draws) if start_correct.numel() else None
        sure = torch.zeros(0, dtype=torch.long)
        if start_correct.numel():
            sure = sure_images(start_correct, draws, settings.seed)
        if "confirmation" in config.extra:
            confirmation = Confirmation.from_record(config.extra["confirmation"], sure)
        else:  # decided once, when the start has been validated; an older run has none
            confirmation = Confirmation(
                sure, settings.confirm_draws, active=config.epochs_done == 0
            )
            left = votes.budget.left
            if not confirmation.cost:
                confirmation.active = False
            elif (
                confirmation.active
                and left is not None
                and (left < epochs_left * per_validation + confirmation.reserve())
            ):
                confirmation.active = False
                log(
                    f"no confirmation draws: --max-queries leaves {left:,} queries, too few for "
                    f"the validations and 2 × {confirmation.cost:,} confirmation queries; the "
                    "largest radii are guarded by validation's draws alone"
                )
            elif confirmation.active:
                log(
                    f"confirmation: the start answers {len(sure)} held-out images right under all "
                    f"{draws} draws; an epoch that validates better is confirmed on "
                    f"{settings.confirm_draws} further draws of each (up to {confirmation.cost:,} "
                    "queries, and as many for the start the first time)"
                )
            if config.epochs_done == 0:
                config.extra["confirmation"] = confirmation.record()
        best_epoch = int(config.extra.get("best_epoch", config.epochs_done))
        # check_config made sure the kept epoch is among the validated ones
        best_accuracy = next(
            r["noisy_accuracy"] for r in config.validation if r["epoch"] == best_epoch
        )
        for epoch in range(config.epochs_done, settings.epochs):
            # what is held back, from the state alone: a resumed run holds back the same
            ctx.reserved = (settings.epochs - epoch) * per_validation + confirmation.reserve()
            # patience counts from the later of the kept epoch and the head stage's start
            stage_from = max(best_epoch, int(config.extra.get(HEAD_FROM, 0)))
            stalled = settings.patience and config.epochs_done - stage_from >= settings.patience
            if stalled and _head_stage_can_start(ctx, config, settings.epochs - epoch):
                frontend.load_state_dict(best.state_dict())  # the head goes after the best body
                config.extra[HEAD_FROM] = config.epochs_done
                _train_only([frontend, best], config, settings)
                method = Spsa(ctx)
                log(
                    f"distill stopped improving after epoch {config.epochs_done} (keeping epoch "
                    f"{best_epoch}): training an output head after it by SPSA on the "
                    f"{ctx.spendable():,} queries left"
                )
            elif stalled:
                config.extra["stopped_early"] = config.epochs_done
                left = votes.budget.left
                unspent = "" if left is None else f"; {left:,} queries left unspent"
                since = "" if stage_from == best_epoch else " of the head stage"
                log(
                    f"stopped after epoch {config.epochs_done}: validation has not improved on "
                    f"epoch {best_epoch} for {settings.patience} epochs{since}{unspent}"
                )
                break
            left = settings.epochs - epoch
            metrics = await method.epoch(epoch, left)
            correct = await validate(ctx, validation_seed(settings.seed))
            config.extra["scored"] = ctx.scored
            config.epochs_done = epoch + 1
            config.queries = queries_before + votes.budget.reserved
            validated = {**row(epoch + 1, correct, start_correct, draws), "queries": config.queries}
            # a metric with nothing to measure (no query left for it) is left out, not NaN
            validated.update({k: v for k, v in metrics.items() if math.isfinite(v)})
            config.validation.append(validated)
            kept = keeps(validated, best_accuracy, start_levels)
            if kept and confirmation.active:
                tally = await confirmation.passes(ctx, best, frontend)
                start_tally = confirmation.start
                assert start_tally is not None
                config.extra["confirmation"] = confirmation.record()
                config.validation[0]["confirmed"] = start_tally.right
                config.validation[0]["confirmed_wrong"] = start_tally.wrong
                validated["confirmed"], validated["confirmed_wrong"] = tally.right, tally.wrong
                config.queries = queries_before + votes.budget.reserved
                validated["queries"] = config.queries
                kept = confirmation.kept(tally)
                if not kept:
                    level = len(tally.right) - 1
                    seen = sum(confirmation.levels[: level + 1])
                    log(
                        f"epoch {epoch + 1} not kept: more accurate under noise, but of the "
                        f"{len(sure)} held-out images the start answers right under every draw, "
                        f"{tally.right[level]} stay right under {seen} confirmation draws with "
                        f"{tally.wrong[level]} wrong answers among them (the start: "
                        f"{start_tally.right[level]}, {start_tally.wrong[level]} wrong): it "
                        "would certify less at the largest radii"
                    )
            if kept:
                best_accuracy, best_epoch = validated["noisy_accuracy"], epoch + 1
                best.load_state_dict(frontend.state_dict())
            elif validated["noisy_accuracy"] > best_accuracy and "confirmed" not in validated:
                log(
                    f"epoch {epoch + 1} not kept: more accurate under noise "
                    f"({validated['noisy_accuracy']:.3f}) but, for some k, fewer images right "
                    f"in at least k of {draws} draws than the start (it would certify less at "
                    "large radii)"
                )
            config.extra["best_epoch"] = best_epoch
            checkpoint()
            low, high = validated["interval"]
            log(
                f"epoch {epoch + 1} of {settings.epochs}: noisy accuracy "
                f"{validated['noisy_accuracy']:.3f} ({low:.3f}–{high:.3f}) on the held-out images, "
                f"{config.queries:,} queries; keeping epoch {best_epoch}"
            )
    config.extra["seconds"] = config.extra.get("seconds", 0.0) + time.perf_counter() - start
    checkpoint()
    return TrainResult(config, best.eval(), time.perf_counter() - start, sent=votes.sent)


MIN_HELD_OUT = 10  # fewer cannot tell an epoch from the start (at 4 draws: 40 answers)


def _check_held_out(
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


def _all_right_from_the_start(
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


def _load_start(base: nn.Module, config: FrontEndConfig, run: Path, device: torch.device) -> None:
    """Load `--start RUN`'s front end into `base`, this run's body; record it (its digest, its
    MSE loss) in `config`. Refused unless it is the same front end: kind, image size and σ, and
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
    config.extra["start"] = {"weights": module_digest(module), "method": started.method or "mse"}
    if "mse_pretrain_loss" in started.extra:
        config.extra["mse_pretrain_loss"] = started.extra["mse_pretrain_loss"]


def _train_only(modules: list[nn.Module], config: FrontEndConfig, settings: TrainSettings) -> None:
    """With an output head, which part trains: the head (spsa, and distill's head stage), or
    the body (distill before its head stage). The flags also set what the checkpoint counts as
    trainable parameters."""
    if not config.head:
        return
    part = "head" if settings.method != "distill" or HEAD_FROM in config.extra else "body"
    for module in modules:
        module.train_only(part)  # type: ignore[operator]


def _head_stage_can_start(ctx: Context, config: FrontEndConfig, epochs_left: int) -> bool:
    """Distill has stopped improving: whether its head stage can take over. It needs a head, a
    black box that answers with scores (SPSA's loss), and queries for a step in each epoch
    left after validation's share."""
    return (
        config.head
        and ctx.settings.method == "distill"
        and ctx.settings.head_stage  # a run resumed with --no-head-stage stops as asked
        and HEAD_FROM not in config.extra
        and bool(config.extra.get("scored"))
        and ctx.spendable() // epochs_left >= 2 * MINIBATCH
    )


def _check_resume(
    config: FrontEndConfig, settings: TrainSettings, blackbox: BlackBox, shape: tuple[int, ...]
) -> None:
    """Resume only the run that was started: name each setting that differs."""
    size = (config.channels, config.height, config.width)
    # validation's draws decide what is kept: a run compares its epochs under the same draws
    levels = config.validation[0].get("consistency") if config.validation else None
    val_draws = len(levels) if levels else settings.val_draws  # older rows may have none
    confirm_draws = (config.extra.get("confirmation") or {}).get("draws", settings.confirm_draws)
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
