"""Reading a proxy request within its caps: the client known by its key, the body read within
--max-body-bytes and --client-timeout and held in memory only with a slot (no client holding
more than a quarter of them where there are keys), the image decoded to the model's shape, and
the service's answer with a bounded number of requests being answered."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict

from ..data import Fit, decode_image, parse_size
from ..errors import EndpointError, UsageError
from ..httpserver import ClientKeys, Refused, holding, read_body
from ..options import ImageOptions, ProxyOptions
from ..tensors import images_of
from . import log
from .service import Service

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/bmp", "image/gif", "image/tiff")


class CertifyRequest(BaseModel):
    """JSON body: the image as base64, and settings within the server's caps."""

    model_config = ConfigDict(extra="forbid")
    image: str
    n: int | None = None
    alpha: float | None = None
    target_radius: float | None = None


class Intake:
    """One app's reading of its requests. `shape` (C, H, W): what every image becomes."""

    def __init__(
        self,
        service: Service,
        settings: ProxyOptions,
        imaging: ImageOptions,
        shape: tuple[int, int, int],
        keys: ClientKeys,
    ) -> None:
        self.service, self.settings, self.imaging, self.shape = service, settings, imaging, shape
        self.size, self.fit = parse_size(imaging.size), Fit.of(imaging)
        self.keys = keys
        self.bodies = asyncio.Semaphore(settings.max_bodies)
        # requests being answered (their images decoded, waiting for a certification): bounded
        self.answering = asyncio.Semaphore(4 * settings.max_bodies)
        # With keys, no one client may hold more than a quarter of the body slots: one client
        # cannot make the others wait (503) by sending many slow bodies at once.
        self.per_client = max(1, settings.max_bodies // 4)
        self.held: Counter[str] = Counter()

    def client(self, request: Request) -> str:
        """The client's name (client-1, …) from its key; 401 without a valid one."""
        return self.keys.name_of(request.headers)

    async def body(self, request: Request) -> bytes:
        """The whole body, at most --max-body-bytes, arriving within --client-timeout."""
        settings = self.settings
        return await read_body(request, settings.max_body_bytes, settings.client_timeout)

    @contextlib.asynccontextmanager
    async def body_slot(self, who: str) -> AsyncIterator[None]:
        if self.keys and self.held[who] >= self.per_client:
            raise Refused(503, f"this key has {self.per_client} request bodies in memory "
                          "already: wait for their answers", {"Retry-After": "1"})  # fmt: skip
        self.held[who] += 1
        try:
            async with holding(self.bodies):
                yield
        finally:
            self.held[who] -= 1
            if not self.held[who]:
                del self.held[who]

    async def image_request(self, request: Request, who: str) -> tuple[np.ndarray, dict[str, Any]]:
        """The image and the JSON settings (none for an image body) of a /v1 request."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and kind not in IMAGE_TYPES:
            raise Refused(415, f"content type {kind[:60] or 'none'!r}: send an image "
                          "(image/png, image/jpeg, …) or application/json")  # fmt: skip
        async with self.body_slot(who):
            data = await self.body(request)
            settings_of: dict[str, Any] = {}
            if kind == "application/json":
                data, settings_of = _json_request(data)
            x = await asyncio.to_thread(decode_image, data, "the image", self.size,
                                        self.imaging.grayscale, self.settings.max_pixels,
                                        self.fit)  # fmt: skip
        shape = self.shape
        if x.shape[0] == 1 and shape[0] == 3:
            x = np.repeat(x, 3, axis=0)  # a grey image for an RGB model, as Pillow converts
        if x.shape != shape:
            want = "×".join(map(str, shape))
            raise Refused(400, f"the image is {'×'.join(map(str, x.shape))} after decoding: "
                          f"this model takes {want} (the proxy's --size, --grayscale)")  # fmt: skip
        return x, settings_of

    async def tensor_request(self, request: Request, who: str) -> np.ndarray:
        """The images of an Open Inference Protocol request (JSON tensors)."""
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind != "application/json":
            raise Refused(415, "the Open Inference Protocol takes application/json")
        settings = self.settings
        async with self.body_slot(who):
            raw = await self.body(request)

            def parse() -> np.ndarray:  # off the event loop: up to --max-body-bytes of JSON
                try:
                    parsed = json.loads(raw)
                except (ValueError, RecursionError):
                    raise Refused(400, "the body is not JSON") from None
                values = settings.max_body_bytes // 2  # a value takes at least two bytes
                return images_of(parsed, settings.max_batch, values, self.shape)

            return await asyncio.to_thread(parse)

    async def answered(self, x: np.ndarray, asked: Any, who: str) -> dict[str, Any]:
        """The service's answer; a failure of the service itself (its cache, its ledger, a
        refused canary, an upstream that failed) is a 5xx whose details stay in the log."""
        if self.answering.locked():
            raise Refused(503, "too many requests being answered: try again",
                          {"Retry-After": "1"})  # fmt: skip
        async with self.answering:
            try:
                return await self.service.answer(x, asked, who)
            except UsageError as e:
                log(f"the service could not answer: {e}")
                raise Refused(503, "the service cannot answer now (its log says why)") from None
            except EndpointError as e:
                log(f"the upstream model failed: {e}")
                raise Refused(502, "the upstream model failed after its retries") from None


def _json_request(data: bytes) -> tuple[bytes, dict[str, Any]]:
    """The image bytes and the settings of a JSON /v1 request."""
    try:
        parsed = CertifyRequest.model_validate_json(data)
    except ValueError as e:
        raise RequestValidationError(getattr(e, "errors", lambda: [])()) from None
    try:
        image = base64.b64decode(parsed.image, validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, "image: not valid base64") from None
    return image, parsed.model_dump(exclude={"image"}, exclude_none=True)
