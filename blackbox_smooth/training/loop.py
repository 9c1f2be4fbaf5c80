"""The loop every method shares: split, targets, MSE pre-training, epochs with validation on
the real black box, a checkpoint per epoch, resume, and the query budget.

`TrainingRun` holds a run's state: its front end's config, its training record (what it did so
far, frontend.json), the current and the kept front end. Resuming is loading the record; each
decision (keep an epoch, confirm it, stop, start the head stage) is a method of its own."""

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
from ..blackbox import BlackBox
from ..cache import BlockCache
from ..errors import UsageError
from ..frontends import (
    FrontEndConfig,
    TrainingRecord,
    from_pretrained,
    read_record,
    save_pretrained,
)
from ..progress import Progress, progress_bar
from ..runfolder import FRONTEND, recover, settings_file
from ..votes import Budget, Votes
from .context import CPU, Context, Method, TrainSettings, split
from .distill import Distill
from .guards import all_right_from_the_start, check_held_out, check_resume
from .objectives import deterministic, validation_seed
from .spsa import MINIBATCH, Spsa
from .start import begin, new_config, train_only
from .validation import Confirmation, consistency, keeps, row, sure_images, validate
from .whitebox import Whitebox

METHODS: dict[str, type[Method]] = {"distill": Distill, "spsa": Spsa, "whitebox": Whitebox}


@dataclass(frozen=True)
class TrainResult:
    config: FrontEndConfig
    record: TrainingRecord
    frontend: nn.Module
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    sent: int = 0  # queries this call sent; record.queries also counts cached answers it used


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
    run = TrainingRun(blackbox, x, labels, settings, Path(out), cache=cache, device=device,
                      concurrency=concurrency, log=log, progress=progress)  # fmt: skip
    return await run.run(resume)


class TrainingRun:
    """One run of `bbsmooth train`, fresh or resumed, until its last epoch or its stop."""

    def __init__(
        self,
        blackbox: BlackBox,
        x: np.ndarray,
        labels: np.ndarray | None,
        settings: TrainSettings,
        out: Path,
        *,
        cache: BlockCache | None,
        device: torch.device,
        concurrency: int,
        log: Callable[[str], None],
        progress: Progress,
    ) -> None:
        self.blackbox, self.labels, self.settings, self.out = blackbox, labels, settings, out
        self.cache, self.device, self.concurrency = cache, device, concurrency
        self.log, self.progress = log, progress
        self.began = time.perf_counter()
        settings.check(labelled=labels is not None)
        recover(out)
        self.x = x
        self.train_idx, self.val_idx = split(len(x), settings.val_fraction, settings.seed)
        self.record = TrainingRecord()  # a resumed run's is read back from its checkpoint
        self.tensors: dict[str, torch.Tensor] = {}  # what the checkpoint read back holds

    async def run(self, resume: bool) -> TrainResult:
        settings, out, n = self.settings, self.out, len(self.x)
        exists = settings_file(out, FRONTEND).exists()
        if exists and not resume:
            raise UsageError(
                f"{out} already holds a run: pass --resume to continue it, or a new --out"
            )
        if len(self.train_idx) < 2:
            raise UsageError(f"--data has {n} images: too few to train and validate on")
        if settings.objective != "mse" and not resume:
            check_held_out(len(self.val_idx), n, settings, self.log)
        self.xt = torch.from_numpy(self.x).to(self.device, torch.float32)
        # copied once (pre-training uses the same)
        self.x_train, self.x_val = self.xt[self.train_idx], self.xt[self.val_idx]
        if resume and exists:
            self._resume()
        else:
            self._begin()
        if settings.objective == "mse":
            self.record.note = "MSE pre-training only: no queries"
            save_pretrained(self.frontend, self.config, out, self.record)
            return TrainResult(self.config, self.record, self.frontend, self._seconds())
        cap = settings.max_queries
        budget = None if cap is None else cap - self.record.queries
        self.votes = Votes(self.blackbox, self.cache, self.concurrency, Budget(budget),
                           charge_cached=True)  # fmt: skip
        # One bar (in a log, a line every few seconds) for the whole run after pre-training:
        # queries as they are answered, the budget its end; the steps inside it add their own.
        with self.progress(f"train {settings.method}", self.votes.budget.left, "q") as advance:
            self.votes.on_asked = advance
            await self._epochs()
        self.record.seconds = (self.record.seconds or 0.0) + self._seconds()
        self.checkpoint()
        return TrainResult(self.config, self.record, self.best.eval(), self._seconds(),
                           sent=self.votes.sent)  # fmt: skip

    def _seconds(self) -> float:
        return time.perf_counter() - self.began

    # -- the front end: resumed from the checkpoint, or built (and pre-trained) --------------

    def _resume(self) -> None:
        """Resuming is loading the record: the kept front end, the current one, the state."""
        settings, out = self.settings, self.out
        self.best, self.config, self.tensors = from_pretrained(out, self.device)
        self.record = read_record(out)
        check_resume(self.config, self.record, settings, self.blackbox, self.x.shape[1:])
        # the state training goes on from; `best` is what certifies
        self.frontend = copy.deepcopy(self.best)
        current = {
            k[len("current.") :]: v for k, v in self.tensors.items() if k.startswith("current.")
        }
        if current:
            self.frontend.load_state_dict(current)
        self._train_only([self.frontend, self.best])
        self.log(
            f"resuming {out} after epoch {self.record.epochs_done} "
            f"({self.record.queries:,} queries so far)"
        )

    def _begin(self) -> None:
        """A new run: its zero-query start, saved before any query."""
        self.config = new_config(self.settings, self.blackbox, self.x.shape[1:])
        self.frontend = begin(self.config, self.record, self.settings, self.x_train, self.device,
                              self.log, self.progress)  # fmt: skip
        self.best = copy.deepcopy(self.frontend)
        save_pretrained(self.frontend, self.config, self.out, self.record)

    def _train_only(self, modules: list[nn.Module]) -> None:
        train_only(modules, self.config, self.settings, self.record)

    # -- the epochs -------------------------------------------------------------------------

    async def _targets(self) -> torch.Tensor:
        """The black box's own answer on the clean image (stability), or the true label."""
        if "targets" in self.tensors:
            return self.tensors["targets"].to(self.device)
        if self.settings.objective == "stability":
            targets = torch.from_numpy((await self.votes.ask(self.xt)).labels).to(self.device)
            memory.release()
            return targets
        assert self.labels is not None
        return torch.from_numpy(self.labels).to(self.device)

    def _context(self, targets: torch.Tensor) -> Context:
        settings = self.settings
        epochs_left = settings.epochs - self.record.epochs_done
        self.per_validation = len(self.val_idx) * settings.val_draws
        validations = epochs_left + (0 if self.record.validation else 1)  # the start's too
        left = self.votes.budget.left
        if left is not None and left < validations * self.per_validation:
            raise UsageError(
                f"--max-queries {settings.max_queries} does not cover validation alone "
                f"({validations} × {self.per_validation:,} queries): raise it, or lower "
                "--epochs, --val-draws or --val-fraction"
            )
        return Context(
            settings=settings,
            frontend=self.frontend,
            blackbox=self.blackbox,
            votes=self.votes,
            device=self.device,
            x_train=self.x_train,
            t_train=targets[self.train_idx],
            x_val=self.x_val,
            t_val=targets[self.val_idx],
            num_classes=int(max(int(targets.max()), 0) + 2),  # + OTHER
            reserved=epochs_left * self.per_validation,
            log=self.log,
            progress=self.progress,
        )

    async def _epochs(self) -> None:
        settings = self.settings
        self.queries_before = self.record.queries
        self.targets = await self._targets()
        self.ctx = self._context(self.targets)
        head_stage = self.record.head_stage_from is not None
        self.method: Method = Spsa(self.ctx) if head_stage else METHODS[settings.method](self.ctx)
        if self.tensors:
            self.method.load_state(
                {k: v.to(self.device) for k, v in self.tensors.items() if k != "targets"}
            )
        if self.record.validation:
            self.start_correct = self._start_answers()
        else:
            await self._validate_start()
        self.confirmation = self._confirmation()
        # migrate made sure the kept epoch is among the validated ones
        self.best_accuracy = next(
            r["noisy_accuracy"]
            for r in self.record.validation
            if r["epoch"] == self.record.kept_epoch
        )
        for epoch in range(self.record.epochs_done, settings.epochs):
            # what is held back, from the state alone: a resumed run holds back the same
            left = settings.epochs - epoch
            self.ctx.reserved = left * self.per_validation + self.confirmation.reserve()
            # stalled: the head stage takes over where it can, else the run stops
            if self._stalled() and not self._start_head_stage(left):
                self._stop_early()
                break
            await self._epoch(epoch)

    def checkpoint(self) -> None:
        """The best validated front end (what certify loads), and what resuming needs: the
        current one, the method's state, the start's validation answers."""
        current = {f"current.{k}": v for k, v in self.frontend.state_dict().items()}
        state = {"validation.start": self.start_correct.to(torch.uint8), **current}
        save_pretrained(self.best, self.config, self.out, self.record, targets=self.targets,
                        **state, **self.method.state())  # fmt: skip

    def _account(self) -> None:
        self.record.queries = self.queries_before + self.votes.budget.reserved

    async def _validate_start(self) -> None:
        """The zero-query start, validated like every epoch after it."""
        settings, held_out = self.settings, len(self.val_idx)
        validations = settings.epochs - self.record.epochs_done + 1
        share = validations * self.per_validation
        cap = settings.max_queries
        of_cap = f" of the {cap:,} ({share / cap:.0%})" if cap else ""
        self.log(
            f"validation on the black box: {held_out} held-out images × "
            f"{settings.val_draws} noise draws = {self.per_validation:,} queries each time, "
            f"{share:,} in all{of_cap}"
        )
        self.start_correct = await validate(self.ctx, validation_seed(settings.seed))
        self.record.scored = self.ctx.scored
        self._account()
        start = self.start_correct
        self.record.validation.append(
            {**row(0, start, start, settings.val_draws), "queries": self.record.queries}
        )
        self.record.best_epoch = 0
        self.checkpoint()
        if bool(start.all()):
            all_right_from_the_start(held_out, settings.val_draws, self.out, settings, self.log)

    def _start_answers(self) -> torch.Tensor:
        """The start's validation answers, each epoch's reference, as the checkpoint kept
        them (runs from before they were kept have none)."""
        kept = self.tensors.get("validation.start")
        if kept is not None and kept.numel():
            return kept.bool()
        if self.record.epochs_done < self.settings.epochs:
            raise UsageError(
                f"{self.out} was trained by an older bbsmooth that kept no validation of its "
                "start: train again with a new --out"
            )
        return torch.zeros(0, dtype=torch.bool)  # an older run, finished: nothing to compare

    def _confirmation(self) -> Confirmation:
        """The confirmation draws: as recorded, or decided once the start is validated."""
        settings, draws, start = self.settings, self.settings.val_draws, self.start_correct
        self.start_levels = consistency(start, draws) if start.numel() else None
        sure = torch.zeros(0, dtype=torch.long)
        if start.numel():
            sure = sure_images(start, draws, settings.seed)
        if self.record.confirmation is not None:
            return Confirmation.from_record(self.record.confirmation, sure)
        confirmation = Confirmation(
            sure, settings.confirm_draws, active=self.record.epochs_done == 0
        )
        left = self.votes.budget.left
        epochs_left = settings.epochs - self.record.epochs_done
        if not confirmation.cost:
            confirmation.active = False
        elif (
            confirmation.active
            and left is not None
            and left < epochs_left * self.per_validation + confirmation.reserve()
        ):
            confirmation.active = False
            self.log(
                f"no confirmation draws: --max-queries leaves {left:,} queries, too few for "
                f"the validations and 2 × {confirmation.cost:,} confirmation queries; the "
                "largest radii are guarded by validation's draws alone"
            )
        elif confirmation.active:
            self.log(
                f"confirmation: the start answers {len(sure)} held-out images right under all "
                f"{draws} draws; an epoch that validates better is confirmed on "
                f"{settings.confirm_draws} further draws of each (up to {confirmation.cost:,} "
                "queries, and as many for the start the first time)"
            )
        if self.record.epochs_done == 0:
            self.record.confirmation = confirmation.record()
        return confirmation

    # -- the decisions ----------------------------------------------------------------------

    def _stage_from(self) -> int:
        """Patience counts from the later of the kept epoch and the head stage's start."""
        return max(self.record.kept_epoch, self.record.head_stage_from or 0)

    def _stalled(self) -> bool:
        patience = self.settings.patience
        return bool(patience) and self.record.epochs_done - self._stage_from() >= patience

    def _start_head_stage(self, epochs_left: int) -> bool:
        """Distill has stopped improving: its head stage takes over if it can. It needs a
        head, a black box that answers with scores (SPSA's loss), and queries for a step in
        each epoch left after validation's share."""
        ctx, record = self.ctx, self.record
        if not (
            self.config.head
            and self.settings.method == "distill"
            and self.settings.head_stage  # a run resumed with --no-head-stage stops as asked
            and record.head_stage_from is None
            and bool(record.scored)
            and ctx.spendable() // epochs_left >= 2 * MINIBATCH
        ):
            return False
        self.frontend.load_state_dict(self.best.state_dict())  # the head after the best body
        record.head_stage_from = record.epochs_done
        self._train_only([self.frontend, self.best])
        self.method = Spsa(ctx)
        self.log(
            f"distill stopped improving after epoch {record.epochs_done} (keeping epoch "
            f"{record.kept_epoch}): training an output head after it by SPSA on the "
            f"{ctx.spendable():,} queries left"
        )
        return True

    def _stop_early(self) -> None:
        record = self.record
        record.stopped_early = record.epochs_done
        left = self.votes.budget.left
        unspent = "" if left is None else f"; {left:,} queries left unspent"
        since = "" if self._stage_from() == record.kept_epoch else " of the head stage"
        self.log(
            f"stopped after epoch {record.epochs_done}: validation has not improved on "
            f"epoch {record.kept_epoch} for {self.settings.patience} epochs{since}{unspent}"
        )

    async def _epoch(self, epoch: int) -> None:
        """One epoch of the method, validated; kept if it validates (and confirms) better."""
        settings, record = self.settings, self.record
        metrics = await self.method.epoch(epoch, settings.epochs - epoch)
        correct = await validate(self.ctx, validation_seed(settings.seed))
        record.scored = self.ctx.scored
        record.epochs_done = epoch + 1
        self._account()
        validated = {
            **row(epoch + 1, correct, self.start_correct, settings.val_draws),
            "queries": record.queries,
        }
        # a metric with nothing to measure (no query left for it) is left out, not NaN
        validated.update({k: v for k, v in metrics.items() if math.isfinite(v)})
        record.validation.append(validated)
        kept = keeps(validated, self.best_accuracy, self.start_levels)
        if kept and self.confirmation.active:
            kept = await self._confirm(epoch, validated)
        if kept:
            self.best_accuracy, record.best_epoch = validated["noisy_accuracy"], epoch + 1
            self.best.load_state_dict(self.frontend.state_dict())
        elif validated["noisy_accuracy"] > self.best_accuracy and "confirmed" not in validated:
            self.log(
                f"epoch {epoch + 1} not kept: more accurate under noise "
                f"({validated['noisy_accuracy']:.3f}) but, for some k, fewer images right "
                f"in at least k of {settings.val_draws} draws than the start (it would "
                "certify less at large radii)"
            )
        self.checkpoint()
        low, high = validated["interval"]
        self.log(
            f"epoch {epoch + 1} of {settings.epochs}: noisy accuracy "
            f"{validated['noisy_accuracy']:.3f} ({low:.3f}–{high:.3f}) on the held-out images, "
            f"{record.queries:,} queries; keeping epoch {record.kept_epoch}"
        )

    async def _confirm(self, epoch: int, validated: dict[str, Any]) -> bool:
        """Whether the confirmation draws keep an epoch that validated better."""
        confirmation, record = self.confirmation, self.record
        tally = await confirmation.passes(self.ctx, self.best, self.frontend)
        start = confirmation.start
        assert start is not None
        record.confirmation = confirmation.record()
        record.validation[0]["confirmed"] = start.right
        record.validation[0]["confirmed_wrong"] = start.wrong
        validated["confirmed"], validated["confirmed_wrong"] = tally.right, tally.wrong
        self._account()
        validated["queries"] = record.queries
        if confirmation.kept(tally):
            return True
        level = len(tally.right) - 1
        seen = sum(confirmation.levels[: level + 1])
        self.log(
            f"epoch {epoch + 1} not kept: more accurate under noise, but of the "
            f"{len(confirmation.images)} held-out images the start answers right under every "
            f"draw, {tally.right[level]} stay right under {seen} confirmation draws with "
            f"{tally.wrong[level]} wrong answers among them (the start: {start.right[level]}, "
            f"{start.wrong[level]} wrong): it would certify less at the largest radii"
        )
        return False
