"""The smoothed classifier g(x) = argmax_c P[f(front_end(x + δ)) = c], δ ~ N(0, σ²I).

`Smoothed.certify` and `Smoothed.predict` are CERTIFY and PREDICT of Cohen et al. (2019): draw
noise, collect the black box's votes (cached, batched, concurrent), and hand the counts to the
pure statistics of `stats.py`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch

from . import adaptive, frontends, stats
from .blackbox import BlackBox
from .blocks import Block
from .budget import Budget, accounted
from .cache import BlockCache
from .certificate import Certificate, Prediction
from .checks import check_adaptive, check_sampling, check_sigma
from .digests import image_digest, module_digest
from .errors import UsageError
from .ledger import Attempt, Ledger, Standing, model_identity
from .noise import DEVICE_NOISE_VERSION, ESTIMATION, NOISE_VERSION, SELECTION, NoiseStream
from .votes import Tally, Votes

Outcome = TypeVar("Outcome", "Certificate", "Prediction")

Progress = Callable[[int], None]


Result = TypeVar("Result")


def _accounted(
    method: Callable[..., Awaitable[Result]],
) -> Callable[..., Awaitable[Result]]:
    """A procedure on its own account of the budget (budget.accounted): if it fails, what it
    reserved and never sent is given back."""

    @functools.wraps(method)
    async def run(self: Smoothed, *args: Any, **kwargs: Any) -> Result:
        with accounted(self.votes.budget):
            return await method(self, *args, **kwargs)

    return run


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"unknown --device {device!r}: use auto, cpu or cuda") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda asked for, but no CUDA device is available: use auto or cpu"
        )
    return resolved


@dataclass
class Smoothed:
    """A black box (plus an optional front end) smoothed with Gaussian noise of level σ."""

    blackbox: BlackBox
    sigma: float
    frontend: torch.nn.Module | None = None
    seed: int = 0
    cache: BlockCache | None = None
    concurrency: int = 16
    max_queries: int | None = None
    device: str | torch.device = "auto"
    # every look recorded (ledger.py): the user's own ledger unless one is given; None records
    # nothing and marks everything fresh (experiments that look on purpose)
    ledger: Ledger | None = field(default_factory=Ledger)
    # samples of the first cached block asked again before it is replayed (0: none); for a
    # model behind an address, which may change while its cached answers stay
    canary: int = 0
    votes: Votes = field(init=False)

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if self.concurrency < 1:
            raise UsageError(f"--concurrency must be >= 1, got {self.concurrency}")
        self.device = resolve_device(self.device)
        if self.frontend is not None:
            self.frontend = self.frontend.to(self.device).eval()
        self._frontend_digest = None if self.frontend is None else module_digest(self.frontend)
        description = self.blackbox.description or {"fingerprint": self.blackbox.fingerprint}
        self._model = model_identity(description, self._frontend_digest)
        self.votes = Votes(
            self.blackbox,
            self.cache,
            self.concurrency,
            Budget(self.max_queries),
            canary=self.canary if self.cache is not None else 0,
            copies=1 if self.frontend is None else 2,
        )
        self._runner: asyncio.Runner | None = None
        self._front_end_lock = threading.Lock()

    # -- the paper's procedures -------------------------------------------------------------

    @_accounted
    async def certify(
        self,
        x: np.ndarray | torch.Tensor,
        n0: int = 100,
        n: int = 10_000,
        alpha: float = 0.001,
        progress: Progress | None = None,
    ) -> Certificate:
        """CERTIFY: cA from n0 selection samples, pA's lower bound from n disjoint samples."""
        check_sampling(n0=n0, n=n, alpha=alpha)
        start = time.perf_counter()
        x, stream, context = self._prepare(x)
        # the ledger and the cache are files: read and written off the event loop, so that a
        # service certifying many images at once never waits on one of them
        standing = await asyncio.to_thread(
            self._begin, "certify", context, alpha, mode="fixed", n0=n0, n=n
        )
        selection = await asyncio.to_thread(self.votes.plan, stream, context, SELECTION, n0)
        estimation = await asyncio.to_thread(self.votes.plan, stream, context, ESTIMATION, n)
        await self.votes.budget.reserve(sum(b.missing for b in selection + estimation))
        counts0 = await self._sample_noise(stream, x, selection, SELECTION, progress)
        counts = await self._sample_noise(stream, x, estimation, ESTIMATION, progress)
        result = stats.certify(counts0.counts, counts.counts, n, alpha, self.sigma)
        cert = Certificate(
            label=result.label,
            abstain=result.abstain,
            radius=result.radius,
            p_lower=result.p_lower,
            n0=n0,
            n=n,
            alpha=alpha,
            sigma=self.sigma,
            seed=self.seed,
            counts=counts.counts,
            counts_selection=counts0.counts,
            max_radius=stats.max_radius(self.sigma, n, alpha),
            queries_sent=counts0.sent + counts.sent,
            queries_cached=counts0.cached + counts.cached,
            seconds=time.perf_counter() - start,
        )
        return await asyncio.to_thread(self._finish, cert, standing)

    @_accounted
    async def certify_adaptive(
        self,
        x: np.ndarray | torch.Tensor,
        n0: int = 100,
        n_max: int = 100_000,
        alpha: float = 0.001,
        target_radius: float | None = None,
        progress: Progress | None = None,
        bound: str = "union",
        futility: bool = True,
    ) -> Certificate:
        """CERTIFY with early stopping (adaptive.py): the votes are looked at on a schedule of
        sizes fixed in advance, and sampling stops once the answer is known — certified at
        `target_radius` or never will be; without a target (--budget), only once nothing can
        be certified. `bound`: "union" (Clopper–Pearson at α/K at each of K looks) or "cs" (a
        confidence sequence at α). `futility` (with a target): also stop once even an
        optimistic future could not certify by n_max. Selection is sequential too, n0 its cap."""
        check_sampling(n0=n0, n=n_max, alpha=alpha)
        check_adaptive(target_radius, bound)
        start = time.perf_counter()
        x, stream, context = self._prepare(x)
        mode = "budget" if target_radius is None else "target"
        standing = await asyncio.to_thread(
            self._begin, "certify", context, alpha, mode=mode, n0=n0, n_max=n_max, bound=bound,
            target_radius=target_radius, futility=None if target_radius is None else futility,
        )  # fmt: skip

        def look(region: str) -> adaptive.Look:
            return functools.partial(self._look, stream, x, context, region)

        selection = await adaptive.select(look(SELECTION), n0, progress)
        c_a = stats.top_class(selection.counts)
        p_target = None if target_radius is None else stats.p_needed(target_radius, self.sigma)
        schedule = adaptive.Schedule.of(bound, n_max, alpha, p_target)
        looked = await adaptive.estimate(
            look(ESTIMATION), c_a, schedule, n_max, p_target, futility, progress
        )
        budget = target_radius is None
        result, best = adaptive.conclude(c_a, looked, schedule, n_max, alpha, self.sigma, budget)
        cert = Certificate(
            label=result.label,
            abstain=result.abstain,
            radius=result.radius,
            p_lower=result.p_lower,
            n0=selection.m,
            n=looked.m,
            alpha=alpha,
            sigma=self.sigma,
            seed=self.seed,
            counts=looked.counts,
            counts_selection=selection.counts,
            max_radius=best,
            queries_sent=selection.sent + looked.sent,
            queries_cached=selection.m - selection.sent + looked.m - looked.sent,
            seconds=time.perf_counter() - start,
            mode=mode,
            n_max=n_max,
            schedule_looks=looked.looks,
            bound=bound,
        )
        return await asyncio.to_thread(self._finish, cert, standing)

    @_accounted
    async def predict(
        self,
        x: np.ndarray | torch.Tensor,
        n: int = 1_000,
        alpha: float = 0.001,
        progress: Progress | None = None,
    ) -> Prediction:
        """PREDICT: the top class when the binomial test on the top two counts rejects a tie."""
        check_sampling(n0=1, n=n, alpha=alpha)
        start = time.perf_counter()
        x, stream, context = self._prepare(x)
        standing = await asyncio.to_thread(self._begin, "predict", context, alpha, n=n)
        blocks = await asyncio.to_thread(self.votes.plan, stream, context, ESTIMATION, n)
        await self.votes.budget.reserve(sum(b.missing for b in blocks))
        tally = await self._sample_noise(stream, x, blocks, ESTIMATION, progress)
        label, p_value = stats.predict(tally.counts, alpha)
        prediction = Prediction(
            label=label,
            abstain=label == stats.ABSTAIN,
            p_value=p_value,
            n=n,
            alpha=alpha,
            sigma=self.sigma,
            seed=self.seed,
            counts=tally.counts,
            queries_sent=tally.sent,
            queries_cached=tally.cached,
            seconds=time.perf_counter() - start,
        )
        return await asyncio.to_thread(self._finish, prediction, standing)

    # -- synchronous wrappers for scripts ---------------------------------------------------

    def certify_sync(self, x: np.ndarray | torch.Tensor, **kwargs: Any) -> Certificate:
        return self._run(self.certify(x, **kwargs))

    def certify_adaptive_sync(self, x: np.ndarray | torch.Tensor, **kwargs: Any) -> Certificate:
        return self._run(self.certify_adaptive(x, **kwargs))

    def predict_sync(self, x: np.ndarray | torch.Tensor, **kwargs: Any) -> Prediction:
        return self._run(self.predict(x, **kwargs))

    def close(self) -> None:
        self._run(self.aclose())
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    async def aclose(self) -> None:
        await self.blackbox.aclose()

    # -- internals ---------------------------------------------------------------------------

    def _begin(
        self, command: str, context: dict[str, Any], alpha: float, **protocol: Any
    ) -> Standing | None:
        """Record this attempt in the evidence ledger before it looks at a vote (a run cut
        short stays recorded); its standing among the attempts on this image and model."""
        if self.ledger is None:
            return None
        assert isinstance(self.device, torch.device)
        stream = {"seed": self.seed, "noise": context["noise"], "device": self.device.type}
        decided = {k: v for k, v in sorted(protocol.items()) if v is not None}
        attempt = Attempt(command, stream, {**decided, "alpha": alpha}, alpha)
        return self.ledger.begin(self._model, context["image"], self.sigma, attempt)

    def _finish(self, outcome: Outcome, standing: Standing | None) -> Outcome:
        """The outcome with its standing: fresh, looks, alpha_effective, the first attempt."""
        if standing is None:
            return replace(outcome, alpha_effective=outcome.alpha)
        assert self.ledger is not None
        standing = self.ledger.finish(standing, outcome.said())
        return replace(
            outcome,
            fresh=standing.fresh,
            looks=standing.looks,
            alpha_effective=standing.alpha_effective,
            reused=standing.earlier,
        )

    async def _look(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        context: dict[str, Any],
        region: str,
        size: int,
        memory: dict[str, Any],
    ) -> Tally:
        """The votes on the first `size` samples of `region`, for one look of a sequential
        run: blocks answered at an earlier look (kept in `memory`) or in the cache are not
        asked again."""
        blocks = await asyncio.to_thread(self.votes.plan, stream, context, region, size, memory)
        await self.votes.budget.reserve(sum(b.missing for b in blocks))
        return await self.votes.tally(stream, x, self._front_end, blocks, region, None, memory)

    def _run(self, coro: Any) -> Any:
        # One loop for the object's life: the HTTP client's connections belong to it.
        if self._runner is None:
            self._runner = asyncio.Runner()
        return self._runner.run(coro)

    @property
    def model_identity(self) -> str:
        """The smoothed model's identity in the evidence ledger (ledger.model_identity)."""
        return self._model

    @property
    def frontend_digest(self) -> str | None:
        return self._frontend_digest

    @property
    def noise_generator(self) -> str:
        """The noise generator's name (CPU and CUDA draw differently)."""
        assert isinstance(self.device, torch.device)
        return DEVICE_NOISE_VERSION if self.device.type == "cuda" else NOISE_VERSION

    @property
    def identity(self) -> dict[str, Any]:
        """What decides an image's answers besides the image: the black box, the front end,
        σ, the seed and the device kind (CPU and CUDA draw their noise differently)."""
        assert isinstance(self.device, torch.device)
        return {
            "blackbox": self.blackbox.fingerprint,
            "frontend": self._frontend_digest,
            "sigma": self.sigma,
            "seed": self.seed,
            "device": self.device.type,
        }

    def _prepare(
        self, x: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, NoiseStream, dict[str, Any]]:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x)
        x = x.to(self.device, torch.float32)
        if x.ndim != 3:
            raise UsageError(f"an image must be C×H×W, got shape {tuple(x.shape)}")
        digest = image_digest(x)
        assert isinstance(self.device, torch.device)
        stream = NoiseStream(tuple(x.shape), self.sigma, self.seed, digest, self.device)
        context = {
            "blackbox": self.blackbox.fingerprint,
            "frontend": self._frontend_digest,
            "sigma": self.sigma,
            "seed": self.seed,
            "image": digest,
            "noise": stream.version,
        }
        if self.frontend is not None:
            # answers cached before front-end outputs were clipped are for other inputs
            context["frontend_output"] = "clipped to [0,1]"
        return x, stream, context

    def _front_end(self, noisy: torch.Tensor) -> torch.Tensor:
        if self.frontend is None:
            return noisy
        # one block through the front end at a time: torch already runs one on every core,
        # and four at once held four times the memory (+1 GB at 320×320) for no speed
        with self._front_end_lock, torch.inference_mode():
            return frontends.apply(self.frontend, noisy)

    async def _sample_noise(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        blocks: list[Block],
        region: str,
        progress: Progress | None,
    ) -> Tally:
        """The votes of f(front_end(x + δ)) on the planned blocks of one region; x + δ is added
        in float64 and rounded once to float32 (`NoiseStream.noisy`)."""
        return await self.votes.tally(stream, x, self._front_end, blocks, region, progress)
