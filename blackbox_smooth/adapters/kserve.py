"""Open Inference Protocol (KServe V2), as spoken by Triton, MLServer, KServe and Seldon.

One request per batch: a single input tensor of shape [N, …] in the chosen layout and dtype;
the answer's output tensor is N×K scores or N (or N×1) labels. What the user leaves unset
(input name, layout, dtype) is read from the model's metadata (`GET /v2/models/NAME`) when the
server publishes it (Triton does; MLServer's scikit-learn runtime does not), else defaults to
input-0, NCHW, FP32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..blackbox import Answer
from ..digests import fingerprint
from ..errors import ProtocolError, UsageError
from ..options import ChannelOrder, InputDtype, Layout
from ..redaction import redact as redact_secrets
from ..redaction import server_text
from .http import HttpTransport, identity_url, redact
from .modelinput import ModelInput, layout_of

_URL = re.compile(r"^https?://[^/]+(/.*)?/v2/models/([^/]+)(/versions/([^/]+))?/infer$")
_WIRE_DTYPE = {"fp32": "FP32", "uint8": "UINT8"}
_NUMERIC = {
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64",
}  # fmt: skip


@dataclass(frozen=True)
class KServeOptions:
    """None: from the model's metadata, else the default (nchw, fp32, input-0)."""

    input_layout: Layout | None = None
    input_dtype: InputDtype | None = None
    input_scale: float | None = None  # the value [0,1] maps to; None: 1 for fp32, 255 for uint8
    input_name: str | None = None
    output: str | None = None  # None: the first output
    input_mean: str | None = None
    input_std: str | None = None
    channel_order: ChannelOrder | None = None

    @property
    def model_input(self) -> ModelInput:
        return ModelInput.parse(
            self.input_layout,
            self.input_dtype,
            self.input_scale,
            self.input_mean,
            self.input_std,
            self.channel_order,
        )

    @property
    def complete(self) -> bool:
        return None not in (self.input_layout, self.input_dtype, self.input_name)

    def resolve(self, metadata: Any) -> KServeOptions:
        """Fill what is unset from the metadata's first (or the named) input, then defaults."""
        layout, dtype, name = self.input_layout, self.input_dtype, self.input_name
        inputs = metadata.get("inputs") if isinstance(metadata, dict) else None
        tensors = [t for t in inputs if isinstance(t, dict)] if isinstance(inputs, list) else []
        if name is not None:
            tensors = [t for t in tensors if t.get("name") == name]
        if tensors:
            t = tensors[0]
            published = t.get("name")
            if isinstance(published, str) and redact_secrets(published) != published:
                raise ProtocolError("the model's metadata names its input with the API key")
            if not (isinstance(published, str) and 0 < len(published) <= 256):
                published = None  # not a name we can send back: use the default
            name = name or published
            wire = {"FP32": InputDtype.fp32, "UINT8": InputDtype.uint8}
            dtype = dtype or wire.get(str(t.get("datatype")))
            layout = layout or layout_of(t.get("shape"))
        return replace(
            self,
            input_layout=layout or Layout.nchw,
            input_dtype=dtype or InputDtype.fp32,
            input_name=name or "input-0",
        )


def metadata_url(url: str) -> str:
    return url.split("?", 1)[0].removesuffix("/infer")


def is_kserve_url(url: str) -> bool:
    return bool(_URL.match(url.split("?", 1)[0]))


class KServe:
    """`http(s)://HOST/v2/models/NAME[/versions/V]/infer`."""

    cache_by_default = True

    def __init__(
        self,
        url: str,
        transport: HttpTransport,
        options: KServeOptions = KServeOptions(),
        max_batch: int = 64,
    ) -> None:
        m = _URL.match(url.split("?", 1)[0])
        if not m:
            raise UsageError(
                f"{redact(url)} is not an Open Inference Protocol URL: "
                "expected http(s)://HOST/v2/models/NAME[/versions/V]/infer"
            )
        if not options.complete:
            options = options.resolve(transport.get_json_sync(metadata_url(url)))
        self.input = options.model_input
        self.url = url
        self.transport = transport
        self.options = options
        self.max_batch = max_batch
        self.description: dict[str, Any] = {
            "protocol": "kserve-v2",
            "url": identity_url(url, transport.auth),
            "model": m.group(2),
            "version": m.group(4),
            "input_name": options.input_name,
            "layout": options.input_layout,
            "dtype": options.input_dtype,
            "scale": self.input.wire_scale,
            **self.input.describe(),
            "output": options.output,
            "clip": [0.0, 1.0],  # noisy pixels are clipped (and rounded for uint8) on the way
        }
        self.fingerprint = fingerprint(self.description)

    def request(self, images: torch.Tensor) -> dict[str, Any]:
        o = self.options
        assert o.input_dtype is not None  # resolved when the adapter was built
        pixels = self.input.apply(images).cpu().numpy()
        tensor = {
            "name": o.input_name,
            "shape": list(pixels.shape),
            "datatype": _WIRE_DTYPE[o.input_dtype],
            "data": np.ascontiguousarray(pixels.reshape(-1)),
        }
        body: dict[str, Any] = {"inputs": [tensor]}
        if o.output:
            body["outputs"] = [{"name": o.output}]
        return body

    def parse(self, body: Any, n: int) -> Answer:
        if not isinstance(body, dict) or not isinstance(body.get("outputs"), list):
            raise ProtocolError("answer has no 'outputs' list")
        outputs = [t for t in body["outputs"] if isinstance(t, dict)]
        if not outputs:
            raise ProtocolError("answer has an empty 'outputs' list")
        if self.options.output:
            chosen = [t for t in outputs if t.get("name") == self.options.output]
            if not chosen:
                names = server_text(", ".join(str(t.get("name")) for t in outputs[:20]))
                raise ProtocolError(f"answer has no output named {self.options.output!r} ({names})")
            tensor = chosen[0]
        else:
            tensor = outputs[0]
        dtype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
        what = f"output {server_text(tensor.get('name'), 60)!r}"
        if dtype not in _NUMERIC:
            raise ProtocolError(f"{what} has non-numeric datatype {server_text(dtype, 60)!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"{what} has no valid shape")
        if not isinstance(data, list) or math.prod(shape) != len(data) or len(shape) > 2:
            raise ProtocolError(f"{what} data does not fit its shape")
        try:
            arr = np.asarray(data, dtype=np.float64).reshape(shape)
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"{what} data is not a flat list of numbers") from e
        return Answer.from_output(arr, n, what)

    async def classify(self, images: torch.Tensor) -> Answer:
        n = len(images)
        return await self.transport.post_json(
            self.url, self.request(images), lambda body: self.parse(body, n)
        )

    async def aclose(self) -> None:
        await self.transport.aclose()
