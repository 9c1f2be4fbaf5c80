"""The proxy's routes on FastAPI: each request read within its caps (intake.py), the client
known by its key, the answer from service.py, every error one JSON line with its status, and
the metrics (metrics.py).

    POST /v1/certify         an image body (image/png, image/jpeg, …) or JSON with base64
    POST /v1/predict         the same, PREDICT's answer
    GET  /v1/info            settings, model and front-end identity (never a key)
    GET  /healthz, /readyz   alive; ready once the upstream answered
    GET  /metrics            Prometheus
    POST /v2/models/NAME/infer, GET /v2/models/NAME, /v2, /v2/health/*
                             the Open Inference Protocol: the smoothed label and its radius
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from ..data import TooLarge
from ..errors import BudgetExhausted, EndpointError, UsageError
from ..httpserver import ClientKeys, Refused, error_handlers, error_response
from ..options import ImageOptions, ProxyOptions
from ..redaction import printable, redact
from ..tensors import infer_response
from .intake import Intake
from .metrics import Metrics, Wrapped
from .service import DeadlineExceeded, QuotaExceeded, Service


class ProxyAnswer(BaseModel):
    """A certified (or predicted) label. `label` is −1 when abstaining."""

    label: int
    label_name: str | None
    abstain: bool
    queries_sent: int  # upstream queries this request caused (0 when it shared another's)
    queries_replayed: int  # answers replayed from the cache
    shared: bool  # answered by an identical request's certification in flight
    fresh: bool  # the first look at this image under this model (evidence ledger)
    looks: int
    alpha_effective: float
    sigma: float
    alpha: float
    seed: int
    noise: str  # the noise generator
    model: str  # the smoothed model's identity (black box and front end)
    frontend: str | None  # the front end's weights' digest
    seconds: float


class CertifyAnswer(ProxyAnswer):
    radius: float  # l2, on the [0,1] pixel scale, at the resolution the noise was added
    target_radius: float | None
    certified: bool | None  # certified at target_radius (None: no target asked)
    p_lower: float
    n0: int
    n: int
    n_max: int
    mode: str
    bound: str
    max_radius: float


class PredictAnswer(ProxyAnswer):
    p_value: float
    n: int


class Readiness:
    """Whether the upstream answers: probed at start, and again by /readyz while it does not
    (at most every 5 s)."""

    def __init__(self, service: Service, shape: tuple[int, int, int]) -> None:
        self.service, self.shape = service, shape
        self.ready = False
        self.reason = "the upstream has not answered yet"
        self.checked = 0.0

    async def probe(self) -> None:
        """Ready once the upstream answers one mid-grey image (one query)."""
        self.checked = time.monotonic()
        votes = self.service.smoothed.votes
        try:
            await votes.budget.reserve(1)  # the probe is a query like any other
            votes.sent += 1
            await self.service.smoothed.blackbox.classify(torch.full((1, *self.shape), 0.5))
        except Exception as e:  # any failure is "not ready", with its reason
            self.ready = False
            self.reason = printable(redact(f"{type(e).__name__}: {e}"), 300)
            return
        self.ready, self.reason = True, "the upstream answered"

    async def now(self) -> bool:
        if not self.ready and time.monotonic() - self.checked > 5:
            await self.probe()
        return self.ready


def create_app(
    service: Service,
    settings: ProxyOptions,
    imaging: ImageOptions,
    shape: tuple[int, int, int],
    client_keys: list[str],
    info: dict[str, Any],
) -> FastAPI:
    """The ASGI app. `shape` (C, H, W) is what every image becomes and what the readiness
    probe sends; `info` is what /v1/info shows besides the service's settings."""
    metrics = Metrics(service)
    readiness = Readiness(service, shape)
    intake = Intake(service, settings, imaging, shape, ClientKeys(client_keys))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await readiness.probe()
        yield
        await service.smoothed.aclose()

    app = FastAPI(
        title="bbsmooth proxy",
        summary="Certified predictions: each answer a label and its l2 certificate.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Refused, HTTP errors, the unexpected; then the service's own
        exception_handlers={**error_handlers("proxy"), **_error_handlers()},
    )
    _smoothing_routes(app, service, settings, shape, info, intake, metrics)
    _health_routes(app, readiness, intake, metrics)
    _inference_routes(app, service, settings, shape, info, intake, metrics, readiness)
    app.add_middleware(Wrapped, wrap=metrics.measure)
    return app


def _error_handlers() -> dict[Any, Callable[..., Any]]:
    """Errors of the service and of a request's JSON: one JSON line, its status, never a
    traceback."""
    error = error_response

    async def usage(_: Request, e: UsageError) -> Response:
        return error(413 if isinstance(e, TooLarge) else 400, str(e))

    async def quota(_: Request, e: QuotaExceeded) -> Response:
        return error(429, str(e), {"Retry-After": str(int(e.retry_after + 0.999))})

    async def budget(_: Request, e: BudgetExhausted) -> Response:
        return error(429, f"the service's upstream budget is spent: {e}")

    async def deadline(_: Request, e: DeadlineExceeded) -> Response:
        return error(504, str(e))

    async def upstream(_: Request, e: EndpointError) -> Response:
        return error(502, f"the upstream model failed: {e}")

    async def invalid(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    return {UsageError: usage, QuotaExceeded: quota, BudgetExhausted: budget,
            DeadlineExceeded: deadline, EndpointError: upstream,
            RequestValidationError: invalid}  # fmt: skip


def _smoothing_routes(
    app: FastAPI,
    service: Service,
    settings: ProxyOptions,
    shape: tuple[int, int, int],
    info: dict[str, Any],
    intake: Intake,
    metrics: Metrics,
) -> None:
    """/v1: certify, predict, and what the service is."""

    # The routes return their JSON as it is (already checked by construction): the models
    # document it in /openapi.json without being run on every answer.
    @app.post("/v1/certify", response_model=CertifyAnswer)
    async def certify(request: Request) -> Response:
        """Certify the image: its smoothed label and an l2 radius, valid with probability ≥
        1 − α (α as answered; `alpha_effective` when the image was looked at before)."""
        who = intake.client(request)
        x, asked = await intake.image_request(request, who)
        answer = await intake.answered(x, service.question("certify", **asked), who)
        metrics.count(answer)
        return JSONResponse(answer)

    @app.post("/v1/predict", response_model=PredictAnswer)
    async def predict(request: Request) -> Response:
        """PREDICT: the smoothed label, abstaining when the top two are too close to call."""
        who = intake.client(request)
        x, asked = await intake.image_request(request, who)
        if "target_radius" in asked:
            raise Refused(400, "target_radius is for /v1/certify")
        answer = await intake.answered(x, service.question("predict", **asked), who)
        metrics.count(answer)
        return JSONResponse(answer)

    @app.get("/v1/info")
    async def information(request: Request) -> dict[str, Any]:
        intake.client(request)
        s, plan = service.smoothed, service.plan
        return {
            **info,
            "sigma": s.sigma,
            "seed": s.seed,
            "n0": plan.n0,
            "n": plan.n_estimation,
            "alpha": plan.alpha,
            "target_radius": plan.target_radius,
            "mode": plan.mode,
            "bound": plan.bound.value if plan.adaptive else "cp",
            "noise": s.noise_generator,
            "model": s.model_identity,
            "frontend": s.frontend_digest,
            "classes": service.classes,
            "image_shape": list(shape),
            "quota_per_period": settings.quota,
            "quota_period_seconds": settings.quota_period,
            "deadline_seconds": settings.deadline,
            "max_body_bytes": settings.max_body_bytes,
        }


def _health_routes(app: FastAPI, readiness: Readiness, intake: Intake, meter: Metrics) -> None:
    """Alive, ready, and the metrics."""

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await readiness.now()
        return JSONResponse({"ready": ready, "reason": readiness.reason}, 200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        intake.client(request)
        return meter.response()


def _inference_routes(
    app: FastAPI,
    service: Service,
    settings: ProxyOptions,
    shape: tuple[int, int, int],
    info: dict[str, Any],
    intake: Intake,
    metrics: Metrics,
    readiness: Readiness,
) -> None:
    """The Open Inference Protocol."""

    def model_named(name: str) -> None:
        if name != settings.name:
            raise Refused(404, f"no model {name[:60]!r}: this server has {settings.name!r}")

    @app.get("/v2")
    async def server_metadata(request: Request) -> dict[str, Any]:
        intake.client(request)
        return {"name": "bbsmooth-proxy", "version": info.get("version", ""), "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        now = await readiness.now()
        return JSONResponse({"ready": now}, 200 if now else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        intake.client(request)
        model_named(name)
        dims = [-1, *shape]
        return {
            "name": settings.name,
            "platform": "bbsmooth",
            "inputs": [{"name": "images", "datatype": "FP32", "shape": dims}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "radius", "datatype": "FP32", "shape": [-1]},
            ],
        }

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict[str, Any]:
        """The smoothed label and its certified radius for each image, as the Open Inference
        Protocol answers: outputs `label` (INT64, −1 abstains) and `radius` (FP32)."""
        model_named(name)
        who = intake.client(request)
        batch = await intake.tensor_request(request, who)
        asked = service.question("certify")
        answers = await asyncio.gather(*(intake.answered(x, asked, who) for x in batch))
        for answer in answers:
            metrics.count(answer)
        return infer_response(
            settings.name, [a["label"] for a in answers], [a["radius"] for a in answers]
        )
