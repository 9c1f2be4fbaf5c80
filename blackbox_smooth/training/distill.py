"""`distill`: learn a local surrogate of the black box from its answers, train the front end
first-order through the surrogate, and spend the next queries where the surrogate thinks the
front end still fails (where it and the black box are most likely to disagree).

Works with label-only APIs: the surrogate learns from labels alone. A checkpoint holds how to
regenerate every input asked (per epoch: the front end's trainable weights when it asked, and
which of the seeded candidates it chose) and the answers, not the inputs: its size does not
follow the images' size, and a resumed run rebuilds exactly the inputs it had.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import memory
from ..blackbox import labels_in, labels_out
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
    query_seed,
    to_classes,
)

# Candidates through the front end at once: at most 256, and at most CHUNK_BYTES of them, so
# memory stays bounded at any image size (54 at 3×320×320). Fixed by the image size alone, not
# by --max-memory: a resumed run rebuilds its inputs from the same noise in the same chunks.
CHUNK, CHUNK_BYTES = 256, 64 * 2**20


def chunk_size(shape: tuple[int, ...] | torch.Size, most: int = CHUNK) -> int:
    """Images of a batch of `shape` (N×C×H×W) to take at once: at most `most`, CHUNK_BYTES."""
    values = math.prod(int(d) for d in shape[1:])
    return max(1, min(most, CHUNK_BYTES // (4 * values)))


SIDE = 64  # the surrogate sees at most SIDE×SIDE: what it keeps of 20,000 queries stays small
SURROGATE_BATCH = 128


def _nothing(k: int) -> None:
    return None


@dataclass
class Round:
    """One epoch's queries, as a checkpoint keeps them."""

    epoch: int
    candidates: int  # drawn from query_seed(seed, epoch)
    weights: dict[str, torch.Tensor]  # the front end's trainable weights when it asked
    chosen: torch.Tensor  # int32: which candidates were asked, in the order asked
    labels: torch.Tensor  # int32: what the black box answered
    scores: torch.Tensor | None = None  # float16 class probabilities, where the box gives scores


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
        return self.net(shrink(x.clamp(0, 1)))  # the wire clips: it sees what the box sees


def shrink(x: torch.Tensor) -> torch.Tensor:
    """Images larger than SIDE×SIDE averaged down to it (differentiable): at 224×224 the
    surrogate's inputs and activations are 12× smaller; at 28×28 nothing changes."""
    h, w = x.shape[-2:]
    if max(h, w) <= SIDE:
        return x
    scale = SIDE / max(h, w)
    return F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="area")


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
        # What the surrogate learns from: the clean images with their targets, then every input
        # the black box was asked about with its answer (float16, at most SIDE×SIDE).
        step = chunk_size(ctx.x_train.shape)
        self.inputs = torch.cat([shrink(x).half() for x in ctx.x_train.split(step)])
        self.labels = ctx.t_train.clone()
        # The surrogate's targets: the box's probabilities where it gave scores, else one-hot.
        self.soft = F.one_hot(to_classes(self.labels, ctx.num_classes), ctx.num_classes).float()
        self.rounds: list[Round] = []

    # -- checkpoint --------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        s = {f"surrogate.{k}": v for k, v in self.surrogate.state_dict().items()}
        s |= optimizer_state(self.s_opt, "distill.s_opt")
        s |= optimizer_state(self.f_opt, "distill.f_opt")
        for i, r in enumerate(self.rounds):
            s[f"distill.round{i}.meta"] = torch.tensor([r.epoch, r.candidates])
            s[f"distill.round{i}.chosen"] = r.chosen
            s[f"distill.round{i}.labels"] = labels_out(r.labels)  # OTHER as -1 on disk
            if r.scores is not None and r.scores.shape[1] <= DENSE_CLASSES:
                s[f"distill.round{i}.scores"] = r.scores
            elif r.scores is not None:  # at most TOP_CLASSES are non-zero: keep those
                top = r.scores.float().topk(TOP_CLASSES, dim=1)
                s[f"distill.round{i}.top_index"] = top.indices.to(torch.int32)
                s[f"distill.round{i}.top_score"] = top.values.to(torch.float16)
            s |= {f"distill.round{i}.weights.{k}": v for k, v in r.weights.items()}
        return s

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "surrogate."
        surrogate = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not surrogate:
            return
        self.surrogate.load_state_dict(surrogate)
        load_optimizer_state(self.s_opt, state, "distill.s_opt")
        load_optimizer_state(self.f_opt, state, "distill.f_opt")
        i = 0
        while f"distill.round{i}.meta" in state:
            epoch, candidates = (int(v) for v in state[f"distill.round{i}.meta"])
            head = f"distill.round{i}.weights."
            weights = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
            r = Round(
                epoch,
                candidates,
                weights,
                state[f"distill.round{i}.chosen"],
                labels_in(state[f"distill.round{i}.labels"]),
                _scores(state, f"distill.round{i}", self.ctx.num_classes),
            )
            self._remember(r, self._rebuilt(r))  # the same inputs, from seeds and weights
            i += 1

    # -- the candidates of one epoch's queries -------------------------------------------------
    def _candidates(
        self, epoch: int, count: int, frontend: nn.Module
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The noisy front-end outputs one epoch may ask about, a chunk at a time, as (first
        candidate's index, their images' indices, outputs): images and noise from query_seed,
        so the same epoch and weights give the same candidates."""
        ctx = self.ctx
        gen = torch.Generator(device=ctx.device).manual_seed(query_seed(ctx.settings.seed, epoch))
        pick = torch.randint(0, len(ctx.x_train), (count,), generator=gen, device=ctx.device)
        step = chunk_size(ctx.x_train.shape)
        with torch.no_grad():
            for start in range(0, count, step):
                images = pick[start : start + step]
                noisy = add_noise(ctx.x_train[images], ctx.settings.sigma, gen)
                yield start, images, apply(frontend, noisy)

    def _asked(self, r: Round) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The inputs a round asked about, rebuilt from its seed and the front end it had, a
        chunk at a time: (their positions in the order asked, the inputs at full size)."""
        frontend = copy.deepcopy(self.ctx.frontend)
        frontend.load_state_dict(r.weights, strict=False)
        where = torch.full((r.candidates,), -1, dtype=torch.long)
        where[r.chosen.long()] = torch.arange(len(r.chosen))
        for start, _, chunk in self._candidates(r.epoch, r.candidates, frontend):
            take = where[start : start + len(chunk)]
            mask = take >= 0
            if bool(mask.any()):
                yield take[mask], chunk[mask.to(chunk.device)]

    def _rebuilt(self, r: Round) -> torch.Tensor:
        """A round's inputs in the order asked, as the surrogate keeps them (≤ SIDE×SIDE)."""
        parts = list(self._asked(r))
        inputs = torch.cat([shrink(chunk).to(torch.float16) for _, chunk in parts])
        order = torch.cat([at for at, _ in parts]).argsort()
        return inputs[order.to(inputs.device)]

    def _remember(self, r: Round, inputs: torch.Tensor) -> None:
        """Keep a round and its inputs (in the order asked, already shrunk)."""
        self.rounds.append(r)
        self.inputs = torch.cat([self.inputs, inputs.to(torch.float16)])
        self.labels = torch.cat([self.labels, r.labels.to(self.labels)])
        k = self.ctx.num_classes
        if r.scores is None:
            soft = F.one_hot(to_classes(r.labels.to(self.labels), k), k).float()
        else:
            soft = r.scores.float().to(self.soft.device)
        self.soft = torch.cat([self.soft, soft])

    # -- one epoch ---------------------------------------------------------------------------
    async def epoch(self, epoch: int, epochs_left: int) -> dict[str, float]:
        ctx = self.ctx
        noise, order = generators(epoch_seed(ctx.settings.seed, epoch), ctx.device)
        if epoch == 0:  # a first surrogate from the clean answers, to pick the first queries
            steps = 3 * math.ceil(len(self.inputs) / SURROGATE_BATCH)
            with ctx.progress("a first surrogate", steps, "batch") as advance:
                self._fit_surrogate(order, passes=3, advance=advance)
        budget = ctx.spendable() // max(1, epochs_left)
        if budget > 0:
            ctx.log(f"epoch {epoch + 1}: asking {budget:,} of {2 * budget:,} candidate inputs")
        agreement = await self._query(epoch, budget)
        if budget > 0:
            ctx.log(
                f"epoch {epoch + 1}: the surrogate agreed with the black box on {agreement:.0%} "
                "of them; refitting it, then training the front end through it"
            )
        surrogate = 2 * math.ceil(len(self.inputs) / SURROGATE_BATCH)
        frontend = ctx.settings.passes * math.ceil(len(ctx.x_train) / ctx.settings.batch_size)
        with ctx.progress(f"epoch {epoch + 1}: local training", surrogate + frontend,
                          "batch") as advance:  # fmt: skip
            self._fit_surrogate(order, passes=2, advance=advance)
            loss = self._train_frontend(noise, order, advance=advance)
        memory.release()
        return {"surrogate_agreement": agreement, "frontend_loss": loss}

    async def _query(self, epoch: int, budget: int) -> float:
        """Ask the black box on noisy front-end outputs: half where the surrogate's loss is
        highest, half at random, among 2 × budget seeded candidates. Returns the surrogate's
        agreement with the box on them."""
        ctx = self.ctx
        if budget <= 0:
            return float("nan")
        count = 2 * budget
        losses = []
        with ctx.progress(f"epoch {epoch + 1}: scoring candidates", count, "image") as advance:
            for _, images, chunk in self._candidates(epoch, count, ctx.frontend):
                target = to_classes(ctx.t_train[images], ctx.num_classes)
                with torch.no_grad():
                    losses.append(F.cross_entropy(self.surrogate(chunk), target, reduction="none"))
                advance(len(images))
        memory.release()
        loss = torch.cat(losses)
        hard = loss.argsort(descending=True)[: budget // 2]
        rest = torch.ones(count, dtype=torch.bool, device=loss.device)
        rest[hard] = False
        easy = rest.nonzero().squeeze(1)[: budget - len(hard)]
        chosen = torch.cat([hard, easy]).cpu()
        weights = {
            k: v.detach().clone() for k, v in ctx.frontend.named_parameters() if v.requires_grad
        }
        probe = Round(epoch, count, weights, chosen, torch.empty(0, dtype=torch.long))
        # asked a chunk at a time (at 224×224 a round's inputs at full size are gigabytes),
        # then put in the order chosen
        at, kept, labels, scores, agree = [], [], [], [], 0
        for where, chunk in self._asked(probe):
            answer = await ctx.ask(chunk)
            said = torch.from_numpy(answer.labels).to(ctx.device)
            with torch.no_grad():
                guess = self.surrogate(chunk).argmax(1)
            agree += int((guess == to_classes(said, ctx.num_classes)).sum())
            at.append(where)
            kept.append(shrink(chunk).to(torch.float16))
            labels.append(said.cpu().to(torch.int32))
            if answer.scores is not None:
                scores.append(_probabilities(answer.scores, ctx.num_classes))
            memory.release()  # the chunk's front-end pass and requests: gone before the next
        order = torch.cat(at).argsort()
        soft = torch.cat(scores)[order] if len(scores) == len(kept) else None
        r = Round(epoch, count, weights, chosen.to(torch.int32), torch.cat(labels)[order], soft)
        self._remember(r, torch.cat(kept)[order.to(kept[0].device)])
        return agree / max(1, len(chosen))

    def _fit_surrogate(
        self, order: torch.Generator, passes: int, advance: Callable[[int], None] = _nothing
    ) -> None:
        self.surrogate.train()
        for _ in range(passes):
            for idx in batches(len(self.inputs), SURROGATE_BATCH, order):
                idx = idx.to(self.ctx.device)
                logits = self.surrogate(self.inputs[idx].float())
                loss = F.cross_entropy(logits, self.soft[idx])  # soft targets: the box's scores
                self.s_opt.zero_grad()
                loss.backward()
                self.s_opt.step()
                advance(1)
        self.surrogate.eval()

    def _train_frontend(
        self,
        noise: torch.Generator,
        order: torch.Generator,
        advance: Callable[[int], None] = _nothing,
    ) -> float:
        ctx = self.ctx
        for p in self.surrogate.parameters():
            p.requires_grad_(False)
        ctx.frontend.train()
        total, count = 0.0, 0
        targets = to_classes(ctx.t_train, ctx.num_classes)
        for _ in range(ctx.settings.passes):
            for idx in batches(len(ctx.x_train), ctx.settings.batch_size, order):
                idx = idx.to(ctx.device)
                self.f_opt.zero_grad()
                loss = backward_mean(
                    add_noise(ctx.x_train[idx], ctx.settings.sigma, noise),
                    targets[idx],
                    lambda x, t: F.cross_entropy(self.surrogate(apply(ctx.frontend, x)), t),
                )
                self.f_opt.step()
                total, count = total + loss, count + 1
                advance(1)
        ctx.frontend.eval()
        for p in self.surrogate.parameters():
            p.requires_grad_(True)
        return total / max(1, count)


DENSE_CLASSES = 16  # up to this many classes a checkpoint keeps every probability
TOP_CLASSES = 8  # beyond, the surrogate learns from the top 8 (renormalised): ≤ 48 bytes a query


def _scores(state: dict[str, torch.Tensor], key: str, num_classes: int) -> torch.Tensor | None:
    if f"{key}.scores" in state:
        return state[f"{key}.scores"]
    if f"{key}.top_index" not in state:
        return None
    index = state[f"{key}.top_index"].long()
    dense = torch.zeros(len(index), num_classes, dtype=torch.float16)
    return dense.scatter_(1, index, state[f"{key}.top_score"])


def _probabilities(scores: np.ndarray, num_classes: int) -> torch.Tensor:
    """The box's scores as probabilities over the surrogate's classes (the last is OTHER,
    taking the mass of any class beyond; with many classes only the top 8, renormalised):
    rows that are not already distributions are read as logits."""
    p = torch.from_numpy(np.asarray(scores, dtype=np.float64))
    if not (
        bool((p >= 0).all())
        and torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-3)
    ):
        p = torch.softmax(p, dim=1)
    out = torch.zeros(len(p), num_classes, dtype=torch.float64)
    known = min(p.shape[1], num_classes - 1)
    out[:, :known] = p[:, :known]
    out[:, -1] += 1 - out[:, :known].sum(1)
    out.clamp_(0, 1)
    if num_classes > DENSE_CLASSES:
        top = out.topk(TOP_CLASSES, dim=1)
        out = torch.zeros_like(out).scatter_(1, top.indices, top.values)
        out /= out.sum(1, keepdim=True)
    return out.to(torch.float16)
