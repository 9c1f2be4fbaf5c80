"""Google Cloud Vision `images:annotate` with LABEL_DETECTION: up to 16 base64 images per
request and at most 10 MB of JSON per request, so a batch of large images goes as several
requests; each response lists `labelAnnotations` (`description`, `score`), and may hold its
own `error` (a google.rpc.Status) beside them or instead."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import torch

from ..errors import ProtocolError, UsageError
from ..redaction import server_text
from .labels import Pairs
from .vendor import LabelledAPI, pairs

MAX_IMAGES = 16  # per images:annotate request
MAX_REQUEST_BYTES = 10_000_000  # of JSON per request
_PER_IMAGE = 120  # the JSON around one image's base64 (feature, keys), with room to spare
# google.rpc codes for one image that retrying cannot fix (bad image, bad request)
_FATAL = {3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 7: "PERMISSION_DENIED", 16: "UNAUTHENTICATED"}


class CloudVision(LabelledAPI):
    protocol = "google-cloud-vision"
    max_image_bytes = 7_000_000  # base64 grows it by 4/3: the JSON request must stay < 10 MB

    def __init__(self, *args: Any, max_results: int = 10, **kw: Any) -> None:
        super().__init__(*args, max_results=max_results, **kw)
        self.max_results = max_results
        if not 1 <= self.max_batch <= MAX_IMAGES:
            raise UsageError(f"Cloud Vision takes 1..{MAX_IMAGES} images per request (--batch)")

    def request(self, files: list[bytes]) -> dict[str, Any]:
        feature = {"type": "LABEL_DETECTION", "maxResults": self.max_results}
        return {
            "requests": [
                {"image": {"content": base64.b64encode(f).decode()}, "features": [feature]}
                for f in files
            ]
        }

    async def annotate(self, images: torch.Tensor) -> list[Pairs]:
        groups = requests_within(await self.files_off_loop(images), MAX_REQUEST_BYTES)

        async def ask(files: list[bytes]) -> list[Pairs]:
            n = len(files)
            return await self.transport.post_json(
                self.url, self.request(files), lambda b: parse(b, n)
            )

        answers = await asyncio.gather(*(ask(g) for g in groups))
        return [p for answer in answers for p in answer]


def requests_within(files: list[bytes], limit: int) -> list[list[bytes]]:
    """The files in order, cut into requests whose JSON stays within `limit` bytes."""
    groups: list[list[bytes]] = [[]]
    size = 0
    for f in files:
        cost = 4 * ((len(f) + 2) // 3) + _PER_IMAGE  # base64, then its JSON
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += cost
    return groups


def parse(body: Any, n: int) -> list[Pairs]:
    if not isinstance(body, dict) or not isinstance(body.get("responses"), list):
        raise ProtocolError("the Cloud Vision answer has no 'responses' list")
    responses = body["responses"]
    if len(responses) != n:
        raise ProtocolError(
            f"the Cloud Vision answer has {len(responses)} responses for {n} images"
        )
    out = []
    for i, response in enumerate(responses):
        if not isinstance(response, dict):
            raise ProtocolError(f"Cloud Vision response {i} is not an object")
        error = response.get("error")
        labelled = response.get("labelAnnotations")
        # The schema lets a response carry labels and an error (of another feature, or a
        # partial failure): the labels it did give are the answer.
        if isinstance(error, dict) and not labelled:
            code, message = error.get("code"), server_text(error.get("message", ""))
            text = f"Cloud Vision could not label image {i}: {message} (code {server_text(code)})"
            if code in _FATAL:
                raise UsageError(text)
            raise ProtocolError(text)  # transient (INTERNAL, UNAVAILABLE, …): asked again
        # An image with no labels has no labelAnnotations: it votes OTHER.
        out.append(pairs(response.get("labelAnnotations", []), "description", "score",
                         f"Cloud Vision response {i}"))  # fmt: skip
    return out
