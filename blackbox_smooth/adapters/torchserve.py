"""TorchServe's inference API: POST the image file to `/predictions/MODEL[/VERSION]`; its image
classifier handler answers the top classes as `{label: probability, …}`."""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .labels import Pairs
from .vendor import LabelledAPI, check_count, label_of, score_of


class TorchServe(LabelledAPI):
    protocol = "torchserve"

    async def ask_one(self, data: bytes) -> Pairs:
        return await self.transport.post_file(self.url, data, "application/octet-stream", parse)


def parse(body: Any) -> Pairs:
    if isinstance(body, list) and len(body) == 1:  # a batch of one, as some handlers answer
        body = body[0]
    if not isinstance(body, dict):
        raise ProtocolError("the TorchServe answer is not a {label: probability} object")
    what = "the TorchServe answer"
    check_count(len(body), what)
    return [(label_of(k, what), score_of(v, what)) for k, v in body.items()]
