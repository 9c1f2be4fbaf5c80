"""What the vision APIs that take image files and answer label strings share: encode the noisy
images, send them, read (label, score) pairs, and let the label map turn those into classes.
Each vendor module only says how one request and one answer look."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import torch

from ..blackbox import Answer
from ..digests import fingerprint
from ..errors import ProtocolError
from ..redaction import server_text
from .encoding import Encoding
from .http import HttpTransport
from .labels import LabelMap, Pairs
from .urls import identity_url


class LabelledAPI:
    """Base for the vendor adapters; subclasses set `protocol`, `max_image_bytes`, and either
    `ask_one` (one image per request) or override `annotate` (several)."""

    protocol = "?"
    max_image_bytes: int | None = None
    cache_by_default = True
    # per pixel value while a request is built and sent: 8-bit pixels, a file of about their
    # size (noise does not compress), and its base64 where the body is JSON
    wire_bytes_per_value = 1 + 1 + 1.4

    def __init__(
        self,
        url: str,
        transport: HttpTransport,
        labels: LabelMap | None = None,
        encoding: Encoding | None = None,
        max_batch: int = 1,
        **extra: Any,
    ) -> None:
        self.url = url
        self.transport = transport
        self.labels = labels or LabelMap.identity()
        self.encoding = encoding or Encoding()
        self.max_batch = max_batch
        self.description: dict[str, Any] = {
            "protocol": self.protocol,
            "url": identity_url(url, transport.auth),
            "labels": self.labels.digest,
            **self.encoding.describe(),
            **extra,
        }
        self.fingerprint = fingerprint(self.description)

    def files(self, images: torch.Tensor) -> list[bytes]:
        return self.encoding.encode(images, self.max_image_bytes, self.protocol)

    async def files_off_loop(self, images: torch.Tensor) -> list[bytes]:
        """`files` in a worker thread: encoding is the client's main work per query, and the
        encoders release the GIL, so concurrent requests encode in parallel while the event
        loop keeps sending."""
        return await asyncio.to_thread(self.files, images)

    async def annotate(self, images: torch.Tensor) -> list[Pairs]:
        """Every image's (label, score) answers, in order."""
        files = await self.files_off_loop(images)
        return list(await asyncio.gather(*(self.ask_one(f) for f in files)))

    async def ask_one(self, data: bytes) -> Pairs:
        raise NotImplementedError

    async def classify(self, images: torch.Tensor) -> Answer:
        return self.labels.answer(await self.annotate(images), self.protocol)

    async def aclose(self) -> None:
        await self.transport.aclose()


MAX_LABELS = 10_000  # per image: more is not an answer but an attempt to make us hold it


def pairs(items: Any, label_key: str, score_key: str, what: str) -> Pairs:
    """`[{label_key: str, score_key: number}, …]` → [(label, score), …], or ProtocolError."""
    if not isinstance(items, list):
        raise ProtocolError(f"{what} is not a list of labels")
    check_count(len(items), what)
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(f"{what} holds {type(item).__name__}, not an object")
        out.append((label_of(item.get(label_key), what), score_of(item.get(score_key), what)))
    return out


def label_of(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(f"{what} has a label that is not a string: {server_text(value, 40)}")
    return str(value)


def score_of(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(
            f"{what} has a score that is not a finite number: {server_text(value, 40)}"
        )
    return float(value)


def check_count(count: int, what: str) -> None:
    if count > MAX_LABELS:
        raise ProtocolError(f"{what} holds {count:,} labels for one image (at most {MAX_LABELS:,})")
