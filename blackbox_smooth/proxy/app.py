"""The proxy's routes on FastAPI: each request read within its caps, the client known by its
key, the answer from service.py, every error one JSON line with its status, and the metrics.

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
import base64
import binascii
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import prometheus_client as prom
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from ..data import Fit, TooLarge, decode_image
from ..errors import BudgetExhausted, EndpointError, UsageError
from ..httpserver import ClientKeys, Refused, error_handlers, error_response, holding, read_body
from ..options import ImageOptions, ProxyOptions
from ..redaction import printable, redact
from ..tensors import images_of, infer_response
from . import log
from .service import DeadlineExceeded, QuotaExceeded, Service

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff")


class CertifyRequest(BaseModel):
    """JSON body: the image as base64, and settings within the server's caps."""

    model_config = ConfigDict(extra="forbid")
    image: str
    n: int | None = None
    alpha: float | None = None
    target_radius: float | None = None


class Answer(BaseModel):
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


class CertifyAnswer(Answer):
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


class PredictAnswer(Answer):
    p_value: float
    n: int


@dataclass
class Readiness:
    ready: bool = False
    reason: str = "the upstream has not answered yet"
    checked: float = 0.0


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
    from ..data import parse_size

    size, fit = parse_size(imaging.size), Fit.of(imaging)
    keys = ClientKeys(client_keys)
    registry = prom.CollectorRegistry()
    requests = prom.Counter("bbsmooth_requests", "Requests", ["route", "status"], registry=registry)
    latency = prom.Histogram("bbsmooth_request_seconds", "Time to answer", ["route"],
                             registry=registry,
                             buckets=(0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120))  # fmt: skip
    in_flight = prom.Gauge("bbsmooth_in_flight", "Requests being answered", registry=registry)
    outcomes = prom.Counter("bbsmooth_answers", "Answers", ["kind"], registry=registry)
    upstream = prom.Counter("bbsmooth_upstream_queries", "Upstream queries", ["kind"],
                            registry=registry)  # fmt: skip
    budget_left = prom.Gauge("bbsmooth_budget_left", "Upstream queries left in --max-queries "
                             "(-1: no limit)", registry=registry)  # fmt: skip
    budget_left.set_function(lambda: _budget_left(service))
    readiness = Readiness()
    bodies = asyncio.Semaphore(settings.max_bodies)
    # requests being answered (their images decoded, waiting for a certification): bounded
    answering = asyncio.Semaphore(4 * settings.max_bodies)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _probe(service, shape, readiness)
        yield
        await service.smoothed.aclose()

    app = FastAPI(
        title="bbsmooth proxy",
        summary="Certified predictions: each answer a label and its l2 certificate.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        exception_handlers=error_handlers("proxy"),  # Refused, HTTP errors, the unexpected
    )

    # -- errors: one JSON line, its status, never a traceback --------------------------------

    error = error_response

    @app.exception_handler(UsageError)
    async def _usage(_: Request, e: UsageError) -> Response:
        return error(413 if isinstance(e, TooLarge) else 400, str(e))

    @app.exception_handler(QuotaExceeded)
    async def _quota(_: Request, e: QuotaExceeded) -> Response:
        return error(429, str(e), {"Retry-After": str(int(e.retry_after + 0.999))})

    @app.exception_handler(BudgetExhausted)
    async def _budget(_: Request, e: BudgetExhausted) -> Response:
        return error(429, f"the service's upstream budget is spent: {e}")

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(_: Request, e: DeadlineExceeded) -> Response:
        return error(504, str(e))

    @app.exception_handler(EndpointError)
    async def _upstream(_: Request, e: EndpointError) -> Response:
        return error(502, f"the upstream model failed: {e}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    # -- metrics of every request --------------------------------------------------------

    def measure(inner: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """Every HTTP request counted by route and status, and timed (a plain ASGI wrapper:
        Starlette's http middleware costs a task and a stream per request)."""

        async def measured(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            start, status = time.perf_counter(), 500
            in_flight.inc()

            async def sending(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await inner(scope, receive, sending)
            finally:
                in_flight.dec()
                name = getattr(scope.get("route"), "path", "other")
                requests.labels(name, str(status)).inc()
                latency.labels(name).observe(time.perf_counter() - start)

        return measured

    # -- reading a request ---------------------------------------------------------------

    def client(request: Request) -> str:
        """The client's name (client-1, …) from its key; 401 without a valid one."""
        return keys.name_of(request.headers)

    async def body(request: Request) -> bytes:
        """The whole body, at most --max-body-bytes, arriving within --client-timeout."""
        return await read_body(request, settings.max_body_bytes, settings.client_timeout)

    # With keys, no one client may hold more than a quarter of the body slots: one client
    # cannot make the others wait (503) by sending many slow bodies at once.
    per_client = max(1, settings.max_bodies // 4)
    held: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def body_slot(who: str) -> AsyncIterator[None]:
        if keys and held[who] >= per_client:
            raise Refused(503, f"this key has {per_client} request bodies in memory already: "
                          "wait for their answers", {"Retry-After": "1"})  # fmt: skip
        held[who] += 1
        try:
            async with holding(bodies):
                yield
        finally:
            held[who] -= 1
            if not held[who]:
                del held[who]

    async def image_request(request: Request, who: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The image and the JSON settings (none for an image body) of a /v1 request."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and kind not in IMAGE_TYPES:
            raise Refused(415, f"content type {kind[:60] or 'none'!r}: send an image "
                          "(image/png, image/jpeg, …) or application/json")  # fmt: skip
        async with body_slot(who):
            data = await body(request)
            settings_of: dict[str, Any] = {}
            if kind == "application/json":
                try:
                    parsed = CertifyRequest.model_validate_json(data)
                except ValueError as e:
                    raise RequestValidationError(getattr(e, "errors", lambda: [])()) from None
                try:
                    data = base64.b64decode(parsed.image, validate=True)
                except (binascii.Error, ValueError):
                    raise Refused(400, "image: not valid base64") from None
                settings_of = parsed.model_dump(exclude={"image"}, exclude_none=True)
            x = await asyncio.to_thread(decode_image, data, "the image", size,
                                        imaging.grayscale, settings.max_pixels, fit)  # fmt: skip
        if x.shape[0] == 1 and shape[0] == 3:
            x = np.repeat(x, 3, axis=0)  # a grey image for an RGB model, as Pillow converts
        if x.shape != shape:
            want = "×".join(map(str, shape))
            raise Refused(400, f"the image is {'×'.join(map(str, x.shape))} after decoding: "
                          f"this model takes {want} (the proxy's --size, --grayscale)")  # fmt: skip
        return x, settings_of

    async def answered(x: np.ndarray, asked: Any, who: str) -> dict[str, Any]:
        """The service's answer; a failure of the service itself (its cache, its ledger, a
        refused canary, an upstream that failed) is a 5xx whose details stay in the log."""
        if answering.locked():
            raise Refused(503, "too many requests being answered: try again",
                          {"Retry-After": "1"})  # fmt: skip
        async with answering:
            try:
                return await service.answer(x, asked, who)
            except UsageError as e:
                log(f"the service could not answer: {e}")
                raise Refused(503, "the service cannot answer now (its log says why)") from None
            except EndpointError as e:
                log(f"the upstream model failed: {e}")
                raise Refused(502, "the upstream model failed after its retries") from None

    def count(answer: dict[str, Any]) -> None:
        outcomes.labels("abstain" if answer["abstain"] else "label").inc()
        upstream.labels("sent").inc(answer["queries_sent"])
        upstream.labels("replayed").inc(answer["queries_replayed"])

    # -- routes ----------------------------------------------------------------------------

    # The routes return their JSON as it is (already checked by construction): the models
    # document it in /openapi.json without being run on every answer.
    @app.post("/v1/certify", response_model=CertifyAnswer)
    async def certify(request: Request) -> Response:
        """Certify the image: its smoothed label and an l2 radius, valid with probability ≥
        1 − α (α as answered; `alpha_effective` when the image was looked at before)."""
        who = client(request)
        x, asked = await image_request(request, who)
        answer = await answered(x, service.question("certify", **asked), who)
        count(answer)
        return JSONResponse(answer)

    @app.post("/v1/predict", response_model=PredictAnswer)
    async def predict(request: Request) -> Response:
        """PREDICT: the smoothed label, abstaining when the top two are too close to call."""
        who = client(request)
        x, asked = await image_request(request, who)
        if "target_radius" in asked:
            raise Refused(400, "target_radius is for /v1/certify")
        answer = await answered(x, service.question("predict", **asked), who)
        count(answer)
        return JSONResponse(answer)

    @app.get("/v1/info")
    async def information(request: Request) -> dict[str, Any]:
        client(request)
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

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not readiness.ready and time.monotonic() - readiness.checked > 5:
            await _probe(service, shape, readiness)
        status = 200 if readiness.ready else 503
        return JSONResponse({"ready": readiness.ready, "reason": readiness.reason}, status)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        client(request)
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    # -- the Open Inference Protocol ----------------------------------------------------------

    def model_named(name: str) -> None:
        if name != settings.name:
            raise Refused(404, f"no model {name[:60]!r}: this server has {settings.name!r}")

    @app.get("/v2")
    async def server_metadata(request: Request) -> dict[str, Any]:
        client(request)
        return {"name": "bbsmooth-proxy", "version": info.get("version", ""), "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        response = await readyz()
        return JSONResponse({"ready": readiness.ready}, response.status_code)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str, request: Request) -> dict[str, Any]:
        client(request)
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
        who = client(request)
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind != "application/json":
            raise Refused(415, "the Open Inference Protocol takes application/json")
        async with body_slot(who):
            raw = await body(request)

            def parse() -> np.ndarray:  # off the event loop: up to --max-body-bytes of JSON
                try:
                    parsed = json.loads(raw)
                except (ValueError, RecursionError):
                    raise Refused(400, "the body is not JSON") from None
                values = settings.max_body_bytes // 2  # a value takes at least two bytes
                return images_of(parsed, settings.max_batch, values, shape)

            batch = await asyncio.to_thread(parse)
        asked = service.question("certify")
        answers = await asyncio.gather(*(answered(x, asked, who) for x in batch))
        for answer in answers:
            count(answer)
        return infer_response(
            settings.name, [a["label"] for a in answers], [a["radius"] for a in answers]
        )

    app.add_middleware(_Wrapped, wrap=measure)
    return app


class _Wrapped:
    """An ASGI middleware made of a function that wraps the app (Starlette's way to add one)."""

    def __init__(self, app: Any, wrap: Callable[[Any], Any]) -> None:
        self.run = wrap(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.run(scope, receive, send)


def _budget_left(service: Service) -> float:
    left = service.smoothed.votes.budget.left
    return -1.0 if left is None else float(left)


async def _probe(service: Service, shape: tuple[int, int, int], readiness: Readiness) -> None:
    """Ready once the upstream answers one mid-grey image (one query)."""
    readiness.checked = time.monotonic()
    votes = service.smoothed.votes
    try:
        await votes.budget.reserve(1)  # the probe is a query like any other
        votes.sent += 1
        await service.smoothed.blackbox.classify(torch.full((1, *shape), 0.5))
    except Exception as e:  # any failure is "not ready", with its reason
        readiness.ready = False
        readiness.reason = printable(redact(f"{type(e).__name__}: {e}"), 300)
        return
    readiness.ready, readiness.reason = True, "the upstream answered"
