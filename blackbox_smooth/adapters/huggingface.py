"""Hugging Face image classification (Inference API, Inference Endpoints, TGI-style servers):
POST the image file, answer `[{"label": str, "score": float}, …]`."""

from __future__ import annotations

from typing import Any

from .labels import Pairs
from .vendor import LabelledAPI, pairs


class HuggingFace(LabelledAPI):
    protocol = "huggingface"
    max_image_bytes = 10_000_000  # well under the serverless API's request limit

    async def ask_one(self, data: bytes) -> Pairs:
        return await self.transport.post_file(self.url, data, self.encoding.mime, parse)


def parse(body: Any) -> Pairs:
    # Some servers wrap one image's answer in an outer list (a batch of one).
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], list):
        body = body[0]
    return pairs(body, "label", "score", "the Hugging Face answer")
