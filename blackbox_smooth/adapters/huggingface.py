"""Hugging Face image classification (Inference API, Inference Endpoints, TGI-style servers):
POST the image file, answer `[{"label": str, "score": float}, …]`. The answer holds the top 5
labels unless asked for more: with `top_k` the request takes its JSON form,
`{"inputs": BASE64, "parameters": {"top_k": K}}` (the task's published input schema)."""

from __future__ import annotations

import base64
from typing import Any

from ..errors import UsageError
from .labels import Pairs
from .vendor import LabelledAPI, pairs


class HuggingFace(LabelledAPI):
    protocol = "huggingface"
    max_image_bytes = 10_000_000  # a request of at most ~10 MB, in either form

    def __init__(self, *args: Any, top_k: int | None = None, **kw: Any) -> None:
        if top_k is not None:  # only then: the default's fingerprint stays as it was
            kw["top_k"] = top_k
        super().__init__(*args, **kw)
        self.top_k = top_k

    async def ask_one(self, data: bytes) -> Pairs:
        if self.top_k is None:
            return await self.transport.post_file(self.url, data, self.encoding.mime, parse)
        encoded = base64.b64encode(data).decode()
        if len(encoded) > self.max_image_bytes:
            raise UsageError(
                f"an image is {len(encoded):,} bytes in base64 (--top-k sends the JSON form), "
                f"over the {self.max_image_bytes:,} a request may hold: resize the images "
                "(--size HxW) or use --encoding jpeg"
            )
        body = {"inputs": encoded, "parameters": {"top_k": self.top_k}}
        return await self.transport.post_json(self.url, body, parse)


def parse(body: Any) -> Pairs:
    # Some servers wrap one image's answer in an outer list (a batch of one).
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], list):
        body = body[0]
    return pairs(body, "label", "score", "the Hugging Face answer")
