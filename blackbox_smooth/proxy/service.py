"""What the proxy does for each request, apart from HTTP: one certification (or prediction) per
distinct question, shared by every identical request in flight (single flight); per-client
quotas of upstream queries; a deadline that leaves the certification running, so that its
answers are cached for the next attempt; the answer as the JSON the routes return."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..digests import image_digest
from ..errors import BBSmoothError, UsageError
from ..options import CertifyOptions
from ..smooth import Certificate, Prediction, Smoothed


class QuotaExceeded(BBSmoothError):
    """A client has spent its upstream queries for this period (429)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The answer took longer than --deadline (504); the work goes on and is cached."""


class Quotas:
    """Upstream queries per client and period. The worst case of a request is reserved before
    its certification starts and stays reserved, whatever period it runs into, until it ends
    and what it spent is charged: so no period sees more than the quota sent."""

    def __init__(
        self,
        per_period: int | None,
        period: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_period, self.period, self.clock = per_period, period, clock
        self._spent: dict[str, tuple[float, int]] = {}  # client → (period start, spent in it)
        self._reserved: dict[str, int] = {}  # client → reservations not yet settled

    def _period(self, client: str) -> tuple[float, int]:
        now = self.clock()
        start, spent = self._spent.get(client, (now, 0))
        if now - start >= self.period:
            start, spent = now, 0
        self._spent[client] = (start, spent)
        return start, spent

    def reserve(self, client: str, queries: int) -> None:
        """Hold `queries` of the client's quota; QuotaExceeded (429) when it has not that many
        left this period."""
        if self.per_period is None:
            return
        start, spent = self._period(client)
        held = self._reserved.get(client, 0)
        if spent + held + queries > self.per_period:
            retry = max(1.0, start + self.period - self.clock())
            left = max(0, self.per_period - spent - held)
            raise QuotaExceeded(
                f"this request may cost {queries:,} upstream queries and {client} has "
                f"{left:,} of its {self.per_period:,} left this period",
                retry,
            )
        self._reserved[client] = held + queries

    def settle(self, client: str, reserved: int, spent: int) -> None:
        """A request ended: its reservation goes, what it spent is charged to this period."""
        if self.per_period is None:
            return
        self._reserved[client] = max(0, self._reserved.get(client, 0) - reserved)
        start, total = self._period(client)
        self._spent[client] = (start, total + spent)


class QuotaKeeper(Protocol):
    """Quotas here (`Quotas`) or a cluster's (replicas.SharedQuotas, whose reserve is awaited)."""

    def reserve(self, client: str, queries: int) -> Awaitable[None] | None: ...

    def settle(self, client: str, reserved: int, spent: int) -> None: ...


@dataclass(frozen=True)
class Asked:
    """What one request asks, within the server's caps (`Service.question`)."""

    command: str  # certify | predict
    plan: CertifyOptions  # certify: the protocol; predict: n and α in it


class Service:
    """The smoothed classifier behind the routes: one per proxy process."""

    def __init__(
        self,
        smoothed: Smoothed,
        plan: CertifyOptions,
        quotas: QuotaKeeper,
        deadline: float,
        classes: list[str] | None = None,
    ) -> None:
        self.smoothed, self.plan, self.quotas = smoothed, plan, quotas
        self.deadline, self.classes = deadline, classes
        self._flights: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self.shared = 0  # requests answered by another request's certification

    # -- what a request may ask ---------------------------------------------------------

    def question(
        self,
        command: str = "certify",
        n: int | None = None,
        alpha: float | None = None,
        target_radius: float | None = None,
    ) -> Asked:
        """The server's plan with the request's settings, refused (UsageError) beyond the
        server's caps: n at most the server's n, α no looser than the server's."""
        cap = self.plan.n_estimation
        if n is not None and not 1 <= n <= cap:
            named = "--budget less --n0" if self.plan.budget is not None else "--n"
            raise UsageError(f"n must be 1..{cap:,} (the server's {named}), got {n}")
        if alpha is not None and not 0 < alpha <= self.plan.alpha:
            raise UsageError(
                f"alpha must be in (0, {self.plan.alpha:g}] (the server's), got {alpha}"
            )
        if target_radius is not None and not (math.isfinite(target_radius) and target_radius >= 0):
            raise UsageError(f"target_radius must be a finite number >= 0, got {target_radius}")
        if command == "predict":
            return Asked(command, replace(self.plan, n=n or min(1_000, cap),
                                          alpha=alpha or self.plan.alpha, target_radius=None,
                                          budget=None))  # fmt: skip
        base = self.plan
        if target_radius is not None and base.budget is not None:
            base = replace(base, budget=None, n=base.n_estimation)
        chosen = replace(
            base,
            n=n if n is not None else base.n,
            alpha=alpha if alpha is not None else base.alpha,
            target_radius=target_radius if target_radius is not None else base.target_radius,
        )
        return Asked(command, chosen)

    # -- answering ----------------------------------------------------------------------

    async def answer(self, x: np.ndarray, asked: Asked, client: str) -> dict[str, Any]:
        """The request's JSON answer: its own certification, or the one an identical request
        in flight is already making."""
        start = time.perf_counter()
        key = (asked.command, image_digest(x), tuple(sorted(_arguments(asked).items())))
        task = self._flights.get(key)
        if task is None:
            worst = asked.plan.per_image if asked.command == "certify" else asked.plan.n_estimation
            worst += self.smoothed.canary  # a first replay may check the cache first
            pending = self.quotas.reserve(client, worst)
            if pending is not None:  # replicas' quotas, kept by one actor (Ray Serve)
                await pending
                task = self._flights.get(key)  # an identical request may have begun meanwhile
                if task is not None:
                    self.quotas.settle(client, worst, 0)
        shared = task is not None
        if task is None:
            task = asyncio.ensure_future(self._run(x, asked))
            self._flights[key] = task
            task.add_done_callback(lambda t: self._landed(key, t, client, worst))
        else:
            self.shared += 1
        try:
            outcome = await asyncio.wait_for(asyncio.shield(task), self.deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer within --deadline {self.deadline:g} s; the certification goes on "
                "and its answers are cached: ask again to get it"
            ) from None
        return self.to_json(outcome, asked, shared, time.perf_counter() - start)

    def _run(self, x: np.ndarray, asked: Asked) -> Awaitable[Certificate | Prediction]:
        if asked.command == "predict":
            return self.smoothed.predict(x, n=asked.plan.n_estimation, alpha=asked.plan.alpha)
        run = self.smoothed.certify_adaptive if asked.plan.adaptive else self.smoothed.certify
        return run(x, **asked.plan.arguments())

    def _landed(
        self, key: tuple[Any, ...], task: asyncio.Task[Any], client: str, worst: int
    ) -> None:
        self._flights.pop(key, None)
        failed = task.cancelled() or task.exception() is not None
        spent = worst if failed else task.result().queries_sent
        self.quotas.settle(client, worst, spent)

    def to_json(
        self, outcome: Certificate | Prediction, asked: Asked, shared: bool, seconds: float
    ) -> dict[str, Any]:
        s = self.smoothed
        name = None
        if not outcome.abstain and self.classes and 0 <= outcome.label < len(self.classes):
            name = self.classes[outcome.label]
        common: dict[str, Any] = {
            "label": outcome.label,
            "label_name": name,
            "abstain": outcome.abstain,
            "queries_sent": 0 if shared else outcome.queries_sent,
            "queries_replayed": outcome.queries_cached,
            "shared": shared,
            "fresh": outcome.fresh,
            "looks": outcome.looks,
            "alpha_effective": outcome.alpha_effective,
            "sigma": s.sigma,
            "alpha": outcome.alpha,
            "seed": s.seed,
            "noise": s.noise_generator,
            "model": s.model_identity,
            "frontend": s.frontend_digest,
            "seconds": seconds,
        }
        if isinstance(outcome, Prediction):
            return {**common, "p_value": outcome.p_value, "n": outcome.n}
        target = asked.plan.target_radius
        certified = None if target is None else not outcome.abstain and outcome.radius >= target
        return {
            **common,
            "radius": outcome.radius,
            "target_radius": target,
            "certified": certified,
            "p_lower": outcome.p_lower,
            "n0": outcome.n0,
            "n": outcome.n,
            "n_max": outcome.n_max,
            "mode": outcome.mode,
            "bound": outcome.bound,
            "max_radius": outcome.max_radius,
        }


def _arguments(asked: Asked) -> dict[str, Any]:
    if asked.command == "predict":
        return {"n": asked.plan.n_estimation, "alpha": asked.plan.alpha}
    return asked.plan.arguments()
