"""`distill`: learn a local surrogate of the black box from its answers, train the front end
first-order through the surrogate, and spend the next queries where the surrogate thinks the
front end still fails (where it and the black box are most likely to disagree).

Works with label-only APIs: the surrogate learns from labels alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .context import Context
from .objectives import (
    add_noise,
    batches,
    epoch_seed,
    generators,
    load_optimizer_state,
    optimizer_state,
    to_classes,
)


class Surrogate(nn.Module):
    """A small CNN for any C×H×W: the local stand-in for the black box."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.clamp(0, 1))  # the wire clips; the surrogate sees what the box sees


class Distill:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        c = ctx.x_train.shape[1]
        with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed only
            torch.manual_seed(ctx.settings.seed)
            self.surrogate = Surrogate(c, ctx.num_classes).to(ctx.device)
        self.s_opt = torch.optim.Adam(self.surrogate.parameters(), lr=1e-3)
        self.f_opt = torch.optim.Adam(
            [p for p in ctx.frontend.parameters() if p.requires_grad], lr=ctx.settings.lr
        )
        # What the black box answered: its inputs (float16 to keep checkpoints small) and labels.
        self.inputs = ctx.x_train.to(torch.float16)
        self.labels = ctx.t_train.clone()

    # -- checkpoint --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        s = {f"surrogate.{k}": v for k, v in self.surrogate.state_dict().items()}
        s |= optimizer_state(self.s_opt, "distill.s_opt")
        s |= optimizer_state(self.f_opt, "distill.f_opt")
        return {**s, "distill.inputs": self.inputs, "distill.labels": self.labels}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if "distill.inputs" in state:
            self.inputs = state["distill.inputs"]
            self.labels = state["distill.labels"]
            prefix = "surrogate."
            self.surrogate.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
            load_optimizer_state(self.s_opt, state, "distill.s_opt")
            load_optimizer_state(self.f_opt, state, "distill.f_opt")

    # -- one epoch ---------------------------------------------------------------------------
    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]:
        ctx = self.ctx
        noise, order = generators(epoch_seed(ctx.settings.seed, epoch), ctx.device)
        if epoch == 0:  # a first surrogate from the clean answers, to pick the first queries
            self._fit_surrogate(order, passes=3)
        agreement = await self._query(noise, order, ctx.spendable() // max(1, epochs_left))
        self._fit_surrogate(order, passes=2)
        loss = self._train_frontend(noise, order)
        return {"surrogate_agreement": agreement, "frontend_loss": loss}

    async def _query(self, noise: torch.Generator, order: torch.Generator, budget: int) -> float:
        """Ask the black box on noisy front-end outputs: half where the surrogate's loss is
        highest, half at random. Returns the surrogate's agreement with the box on them."""
        ctx = self.ctx
        if budget <= 0:
            return float("nan")
        n = len(ctx.x_train)
        pick = torch.randint(0, n, (2 * budget,), generator=order)
        with torch.no_grad():
            xb = ctx.x_train[pick.to(ctx.device)]
            cand = ctx.frontend(add_noise(xb, ctx.settings.sigma, noise)).clamp(0, 1)
            target = to_classes(ctx.t_train[pick.to(ctx.device)], ctx.num_classes)
            loss = F.cross_entropy(self.surrogate(cand), target, reduction="none")
        hard = loss.argsort(descending=True)[: budget // 2]
        rest = torch.ones(len(cand), dtype=torch.bool, device=ctx.device)
        rest[hard] = False
        easy = rest.nonzero().squeeze(1)[: budget - len(hard)]
        chosen = torch.cat([hard, easy])
        inputs = cand[chosen]
        answer = await ctx.ask(inputs)
        labels = torch.from_numpy(answer.labels).to(ctx.device)
        with torch.no_grad():
            guess = self.surrogate(inputs).argmax(1)
        agreement = float((guess == to_classes(labels, ctx.num_classes)).float().mean())
        self.inputs = torch.cat([self.inputs, inputs.to(torch.float16)])
        self.labels = torch.cat([self.labels, labels])
        return agreement

    def _fit_surrogate(self, order: torch.Generator, passes: int) -> None:
        self.surrogate.train()
        targets = to_classes(self.labels, self.ctx.num_classes)
        for _ in range(passes):
            for idx in batches(len(self.inputs), 128, order):
                idx = idx.to(self.ctx.device)
                logits = self.surrogate(self.inputs[idx].float())
                loss = F.cross_entropy(logits, targets[idx])
                self.s_opt.zero_grad()
                loss.backward()
                self.s_opt.step()
        self.surrogate.eval()

    def _train_frontend(self, noise: torch.Generator, order: torch.Generator) -> float:
        ctx = self.ctx
        for p in self.surrogate.parameters():
            p.requires_grad_(False)
        ctx.frontend.train()
        total, count = 0.0, 0
        targets = to_classes(ctx.t_train, ctx.num_classes)
        for _ in range(ctx.settings.passes):
            for idx in batches(len(ctx.x_train), ctx.settings.batch_size, order):
                idx = idx.to(ctx.device)
                out = ctx.frontend(add_noise(ctx.x_train[idx], ctx.settings.sigma, noise))
                loss = F.cross_entropy(self.surrogate(out), targets[idx])
                self.f_opt.zero_grad()
                loss.backward()
                self.f_opt.step()
                total, count = total + loss.item(), count + 1
        ctx.frontend.eval()
        for p in self.surrogate.parameters():
            p.requires_grad_(True)
        return total / max(1, count)
