"""Google Cloud Vision `images:annotate` with LABEL_DETECTION: up to 16 base64 images per
request; each response lists `labelAnnotations` (`description`, `score`), or holds its own
`error` (a google.rpc.Status)."""

from __future__ import annotations

import base64
from typing import Any

import torch

from ..errors import ProtocolError, UsageError
from ..redaction import server_text
from .labels import Pairs
from .vendor import LabelledAPI, pairs

MAX_IMAGES = 16  # per images:annotate request
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
        files = self.files(images)
        n = len(files)
        return await self.transport.post_json(self.url, self.request(files), lambda b: parse(b, n))


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
        if isinstance(error, dict):
            code, message = error.get("code"), server_text(error.get("message", ""))
            text = f"Cloud Vision could not label image {i}: {message} (code {server_text(code)})"
            if code in _FATAL:
                raise UsageError(text)
            raise ProtocolError(text)  # transient (INTERNAL, UNAVAILABLE, …): asked again
        # An image with no labels has no labelAnnotations: it votes OTHER.
        out.append(pairs(response.get("labelAnnotations", []), "description", "score",
                         f"Cloud Vision response {i}"))  # fmt: skip
    return out
