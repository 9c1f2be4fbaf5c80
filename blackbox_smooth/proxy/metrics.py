"""The proxy's Prometheus metrics (GET /metrics): every request counted by route and status and
timed, the requests being answered, the answers by kind, the upstream queries, and the budget
left."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client as prom
from fastapi.responses import Response

from .service import Service

App = Callable[..., Awaitable[None]]  # an ASGI app: (scope, receive, send)


class Metrics:
    """One app's metrics, in a registry of their own."""

    def __init__(self, service: Service) -> None:
        self.registry = registry = prom.CollectorRegistry()
        self.requests = prom.Counter("bbsmooth_requests", "Requests", ["route", "status"],
                                     registry=registry)  # fmt: skip
        self.latency = prom.Histogram("bbsmooth_request_seconds", "Time to answer", ["route"],
                                      registry=registry,
                                      buckets=(0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120))  # fmt: skip
        self.in_flight = prom.Gauge("bbsmooth_in_flight", "Requests being answered",
                                    registry=registry)  # fmt: skip
        self.outcomes = prom.Counter("bbsmooth_answers", "Answers", ["kind"], registry=registry)
        self.upstream = prom.Counter("bbsmooth_upstream_queries", "Upstream queries", ["kind"],
                                     registry=registry)  # fmt: skip
        budget_left = prom.Gauge("bbsmooth_budget_left", "Upstream queries left in "
                                 "--max-queries (-1: no limit)", registry=registry)  # fmt: skip
        budget_left.set_function(lambda: _budget_left(service))

    def measure(self, inner: App) -> App:
        """Every HTTP request counted by route and status, and timed (a plain ASGI wrapper:
        Starlette's http middleware costs a task and a stream per request)."""

        async def measured(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            start, status = time.perf_counter(), 500
            self.in_flight.inc()

            async def sending(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await inner(scope, receive, sending)
            finally:
                self.in_flight.dec()
                name = getattr(scope.get("route"), "path", "other")
                self.requests.labels(name, str(status)).inc()
                self.latency.labels(name).observe(time.perf_counter() - start)

        return measured

    def count(self, answer: dict[str, Any]) -> None:
        """One answer of the service: its kind and what it cost upstream."""
        self.outcomes.labels("abstain" if answer["abstain"] else "label").inc()
        self.upstream.labels("sent").inc(answer["queries_sent"])
        self.upstream.labels("replayed").inc(answer["queries_replayed"])

    def response(self) -> Response:
        return Response(prom.generate_latest(self.registry), media_type=prom.CONTENT_TYPE_LATEST)


class Wrapped:
    """An ASGI middleware made of a function that wraps the app (Starlette's way to add one)."""

    def __init__(self, app: Any, wrap: Callable[[Any], Any]) -> None:
        self.run = wrap(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.run(scope, receive, send)


def _budget_left(service: Service) -> float:
    left = service.smoothed.votes.budget.left
    return -1.0 if left is None else float(left)
