"""What the front end is trained towards, and MSE pre-training (no queries)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from ..frontends import parts
from ..memory import release

PRETRAIN_BATCH = 64
F_ = TypeVar("F_", bound=Callable[..., Any])


@contextlib.contextmanager
def deterministic_kernels() -> Iterator[None]:
    """cuDNN's fastest convolution kernels sum in an order that varies from run to run: the
    same seed gave denoisers 6e-5 apart after 3 MSE epochs on an H100 (identical with these
    flags), so a run's zero-query start was not the start another run of the same settings
    certified. Deterministic cuDNN kernels while training; the caller's flags restored after.
    Other CUDA kernels that add atomically (the backward of adaptive pooling and of area or
    bilinear interpolation: distill's surrogate, the coordinator) are not covered. One training
    per process at a time: overlapping calls would restore each other's flags out of order."""
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


def deterministic(fn: F_) -> F_:
    """Run `fn` (a function or a coroutine function) under `deterministic_kernels`."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with deterministic_kernels():
                return await fn(*args, **kwargs)

        return run_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with deterministic_kernels():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def add_noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """x + δ, δ ~ N(0, σ²I) in float32 on x's device: drawn as in certification."""
    return x + sigma * torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)


def to_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """OTHER (a negative label) becomes its own class, the last one, for local models of the
    black box."""
    return torch.where(labels < 0, torch.full_like(labels, num_classes - 1), labels)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one training epoch's noise and order: a different stream for every epoch
    (epochs < 1,000) and run seed."""
    return seed * 1000 + epoch


def validation_seed(seed: int) -> int:
    """The seed of validation's noise: the same draw every epoch, so validation curves compare
    like with like, and apart from the epochs' streams."""
    return seed + 7919


def confirmation_seed(seed: int) -> int:
    """The seed of the confirmation draws (loop.py): a stream apart from validation's."""
    return seed + 104729


def query_seed(seed: int, epoch: int) -> int:
    """The seed of the candidates one distill epoch may ask about (their images and noise):
    its own stream, apart from training's, so a checkpoint can regenerate them from it."""
    digest = hashlib.sha256(f"bbsmooth distill queries {seed} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch takes seeds below 2⁶³


def generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(noise generator on the device, CPU generator for shuffling), both seeded."""
    noise = torch.Generator(device=device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed + 1)
    return noise, order


def batches(n: int, batch_size: int, order: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=order).split(batch_size))


def backward_mean(
    noisy: torch.Tensor,
    targets: torch.Tensor,
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """Backpropagate a batch's mean loss a part at a time (frontends.parts): the memory of one
    part, the gradient of the whole batch (equal up to rounding; the very same bits where the
    batch is one part, as at 28×28). `loss_of(inputs, targets)` is the mean over a part.
    Returns the batch's mean loss."""
    losses = []
    for part in parts(len(noisy), noisy.shape):
        loss = loss_of(noisy[part], targets[part])
        if part.stop - part.start < len(noisy):
            loss = loss * ((part.stop - part.start) / len(noisy))
        loss.backward()
        losses.append(loss.detach())
    if len(losses) > 1:
        release()  # large images: the parts' graphs go back to the system, not to the heap
    # read back once a batch, as before: each read waits for the GPU
    return float(losses[0] if len(losses) == 1 else torch.stack(losses).sum())


def pretrain_mse(
    frontend: nn.Module,
    x: torch.Tensor,
    sigma: float,
    epochs: int,
    seed: int,
    batch_size: int = PRETRAIN_BATCH,
    lr: float = 2e-3,
    advance: Callable[[int], None] | None = None,
) -> float:
    """Train the front end to map x + δ back to x: no queries at all. Returns the last loss;
    `advance(1)` after each batch."""
    params = [p for p in frontend.parameters() if p.requires_grad]
    if not params or epochs <= 0:
        return float("nan")
    noise, order = generators(seed, x.device)
    opt = torch.optim.Adam(params, lr=lr)

    def mse(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(frontend(noisy), clean)

    frontend.train()
    loss = float("nan")
    for _ in range(epochs):
        for idx in batches(len(x), batch_size, order):
            xb = x[idx.to(x.device)]
            opt.zero_grad()
            loss = backward_mean(add_noise(xb, sigma, noise), xb, mse)
            opt.step()
            if advance is not None:
                advance(1)
    frontend.eval()
    return loss


def optimizer_state(opt: torch.optim.Optimizer, name: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors (Adam's moments and step count) as flat checkpoint
    entries: a resumed run continues exactly where the interrupted one stopped."""
    out = {}
    for index, per_param in opt.state_dict()["state"].items():
        for key, value in per_param.items():
            out[f"{name}.{index}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer_state(
    opt: torch.optim.Optimizer, state: dict[str, torch.Tensor], name: str
) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for entry, value in state.items():
        if entry.startswith(name + "."):
            index, key = entry[len(name) + 1 :].split(".", 1)
            per_param.setdefault(int(index), {})[key] = value
    if per_param:
        opt.load_state_dict({**opt.state_dict(), "state": per_param})
