"""`spsa`: zeroth-order SPSA with gradient correction (the estimator of BlackVIP, used by
PEFTSmoothing's black-box setting) on the front end's trainable parameters, from the black
box's class scores.

Each step draws one Rademacher direction Δ, asks the black box at θ' ± c·Δ (θ' = θ + β·v, the
Nesterov look-ahead that is BlackVIP's gradient correction) on the same noisy minibatch, and
moves along ĝ = (L(θ' + cΔ) − L(θ' − cΔ)) / 2c · Δ with momentum. Variance grows with the number
of parameters, which is why a LoRA adapter (`--lora-rank`) or the coordinator's decoder is the
unit it trains best.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..blackbox import Answer
from ..errors import UsageError
from ..frontends import apply
from .context import Context
from .objectives import add_noise, epoch_seed, generators

MINIBATCH = 32
STEP = 0.02  # a: learning rate of the (normalised) step
PERTURB = 0.01  # c: size of the perturbation
MOMENTUM = 0.9  # β


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A direction of ±1 entries (gen is a CPU generator)."""
    return (torch.randint(0, 2, like.shape, generator=gen) * 2.0 - 1.0).to(like.device)


def spsa_estimate(l_plus: float, l_minus: float, c: float, delta: torch.Tensor) -> torch.Tensor:
    """The two-sided SPSA estimate of ∇L from L(θ + cΔ) and L(θ − cΔ)."""
    return (l_plus - l_minus) / (2 * c) * delta


class Spsa:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.params = [p for p in ctx.frontend.parameters() if p.requires_grad]
        theta = parameters_to_vector(self.params).detach()
        self.velocity = torch.zeros_like(theta)
        self.step = torch.zeros((), dtype=torch.long)
        self._checked = False

    def state(self) -> dict[str, torch.Tensor]:
        return {"spsa.velocity": self.velocity, "spsa.step": self.step}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if "spsa.velocity" in state:
            self.velocity = state["spsa.velocity"].to(self.velocity.device)
            self.step = state["spsa.step"].cpu()

    async def _losses(
        self, theta: torch.Tensor, step: torch.Tensor, inputs: torch.Tensor, target: torch.Tensor
    ) -> tuple[float, float]:
        """Cross-entropy of the black box's scores for the targets with the front end at
        θ + step and θ − step; both batches are asked at once."""
        outs = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                vector_to_parameters(theta + sign * step, self.params)
                outs.append(apply(self.ctx.frontend, inputs))
        plus, minus = await asyncio.gather(self.ctx.ask(outs[0]), self.ctx.ask(outs[1]))
        return self._cross_entropy(plus, target), self._cross_entropy(minus, target)

    @staticmethod
    def _cross_entropy(answer: Answer, target: torch.Tensor) -> float:
        if answer.scores is None:
            raise UsageError(
                "--method spsa needs class scores, but this endpoint answers labels only: "
                "use --method distill, which learns from labels"
            )
        probs = np.clip(answer.scores, 1e-12, None)
        probs = probs / probs.sum(axis=1, keepdims=True)
        t = target.cpu().numpy()
        return float(-np.log(probs[np.arange(len(t)), np.clip(t, 0, probs.shape[1] - 1)]).mean())

    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]:
        ctx = self.ctx
        noise, order = generators(epoch_seed(ctx.settings.seed, epoch), ctx.device)
        steps = ctx.spendable() // max(1, epochs_left) // (2 * MINIBATCH)
        theta = parameters_to_vector(self.params).detach()
        losses = []
        for _ in range(int(steps)):
            k = int(self.step)
            a = STEP / (1 + k / 200) ** 0.602  # Spall's gain sequences
            c = PERTURB / (1 + k / 200) ** 0.101
            idx = torch.randint(0, len(ctx.x_train), (MINIBATCH,), generator=order).to(ctx.device)
            inputs = add_noise(ctx.x_train[idx], ctx.settings.sigma, noise)
            target = ctx.t_train[idx]
            ahead = theta + MOMENTUM * self.velocity

            delta = rademacher(theta, order)
            l_plus, l_minus = await self._losses(ahead, c * delta, inputs, target)
            grad = spsa_estimate(l_plus, l_minus, c, delta)
            self.velocity = MOMENTUM * self.velocity - a * grad / max(1.0, float(grad.norm()))
            theta = theta + self.velocity
            self.step += 1
            losses.append((l_plus + l_minus) / 2)
        vector_to_parameters(theta, self.params)
        return {"spsa_loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps}
