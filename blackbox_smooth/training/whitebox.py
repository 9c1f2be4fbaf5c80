"""`whitebox`: the black box is a local torch model; train the front end by backprop through
it. The upper bound the black-box methods are measured against."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from ..frontends import apply
from .context import Context
from .objectives import (
    add_noise,
    backward_mean,
    batches,
    epoch_seed,
    generators,
    load_optimizer_state,
    optimizer_state,
)


@runtime_checkable
class LocalModel(Protocol):
    """A black box that is a torch module on this machine (adapters.local.TorchModel): named
    by what whitebox reads of it, so that training needs nothing of the adapters."""

    model: nn.Module
    device: torch.device


class Whitebox:
    def __init__(self, ctx: Context) -> None:
        if not isinstance(ctx.blackbox, LocalModel) or not isinstance(
            ctx.blackbox.model, nn.Module
        ):
            raise UsageError(
                "--method whitebox needs a local torch model (--endpoint torch:FILE.pt); "
                "for an API use --method distill or spsa"
            )
        self.ctx = ctx
        self.device = ctx.blackbox.device
        self.model = ctx.blackbox.model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.Adam(
            [p for p in ctx.frontend.parameters() if p.requires_grad], lr=ctx.settings.lr
        )

    def state(self) -> dict[str, torch.Tensor]:
        return optimizer_state(self.opt, "whitebox.opt")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        load_optimizer_state(self.opt, state, "whitebox.opt")

    def _loss(self, noisy: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(apply(self.ctx.frontend, noisy).to(self.device))
        return F.cross_entropy(logits, targets)

    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]:
        ctx = self.ctx
        noise, order = generators(epoch_seed(ctx.settings.seed, epoch), ctx.device)
        ctx.frontend.train()
        total, count = 0.0, 0
        for _ in range(ctx.settings.passes):
            for idx in batches(len(ctx.x_train), ctx.settings.batch_size, order):
                idx = idx.to(ctx.device)
                self.opt.zero_grad()
                loss = backward_mean(
                    add_noise(ctx.x_train[idx], ctx.settings.sigma, noise),
                    ctx.t_train[idx].clamp(min=0),
                    self._loss,
                )
                self.opt.step()
                total, count = total + loss, count + 1
        ctx.frontend.eval()
        return {"frontend_loss": total / max(1, count)}
