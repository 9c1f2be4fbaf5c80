"""Open Inference Protocol (KServe V2), as spoken by Triton, MLServer, KServe and Seldon.

One request per batch: a single input tensor of shape [N, …] in the model's input convention;
the answer's output tensor is N×K scores or N (or N×1) labels. What the user leaves unset
(input name, layout, dtype) is read from the model's metadata (`GET /v2/models/NAME`) when the
server publishes it (Triton does; MLServer's scikit-learn runtime does not), else defaults to
input-0, NCHW, FP32. Where the server lists the binary tensor extension (`GET /v2`), tensors
travel as raw little-endian bytes after a JSON header, both ways, instead of JSON text; where
it publishes the model's `max_batch_size` (`GET /v2/models/NAME/config`, Triton), requests
never exceed it.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

import numpy as np
import orjson
import torch

from ..blackbox import Answer
from ..digests import fingerprint
from ..errors import ProtocolError, UsageError
from ..options import ChannelOrder, InputDtype, Layout
from ..redaction import redact as redact_secrets
from ..redaction import redact_url, server_text
from .http import HttpTransport, Reply, parse_json_body
from .modelinput import ModelInput, layout_of
from .urls import identity_url

_URL = re.compile(r"^https?://[^/]+(/.*)?/v2/models/([^/]+)(/versions/([^/]+))?/infer$")
_WIRE_DTYPE = {"fp32": "FP32", "uint8": "UINT8"}
# the extension's raw layout of each datatype: little-endian, row-major
_RAW = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
_NUMERIC = set(_RAW)
HEADER = "inference-header-content-length"
MAX_BATCH = 64  # images per request unless --batch or the model's max_batch_size says less


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
        return ModelInput.of(self)

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


def server_url(url: str) -> str:
    """`…/v2/models/NAME/infer` → `…/v2`, the server's own metadata (its extensions)."""
    path = url.split("?", 1)[0]
    return path[: path.rindex("/v2/models/")] + "/v2"


def _max_batch_size(config: Any) -> int | None:
    """The model's `max_batch_size` from its configuration, when it publishes a sane one
    (0 means the model does not batch at all: left to the user)."""
    value = config.get("max_batch_size") if isinstance(config, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20:
        return value
    return None


def is_kserve_url(url: str) -> bool:
    return bool(_URL.match(url.split("?", 1)[0]))


class KServe:
    """`http(s)://HOST/v2/models/NAME[/versions/V]/infer`."""

    cache_by_default = True
    labels = None  # it answers class indices or scores itself
    annotate = None

    def __init__(
        self,
        url: str,
        transport: HttpTransport,
        options: KServeOptions = KServeOptions(),
        batch: int | None = None,
    ) -> None:
        m = _URL.match(url.split("?", 1)[0])
        if not m:
            raise UsageError(
                f"{redact_url(url)} is not an Open Inference Protocol URL: "
                "expected http(s)://HOST/v2/models/NAME[/versions/V]/infer"
            )
        if not options.complete:
            options = options.resolve(transport.get_json_sync(metadata_url(url)))
        self.input = options.model_input
        server = transport.get_json_sync(server_url(url), required=False)
        extensions = _dict(server).get("extensions")
        self.binary = isinstance(extensions, list) and "binary_tensor_data" in extensions
        config = transport.get_json_sync(metadata_url(url) + "/config", required=False)
        limit = _max_batch_size(config)
        if batch is not None and limit is not None and batch > limit:
            raise UsageError(
                f"--batch {batch} is over the model's max_batch_size of {limit} (its "
                f"configuration says so): use --batch {limit} or less"
            )
        self.url = url
        self.transport = transport
        self.options = options
        self.max_batch = batch or min(MAX_BATCH, limit or MAX_BATCH)
        # per pixel value while a request is built and sent: the wire tensor, then its body
        # (JSON text: up to ~12 bytes for a float32, 4 for a uint8; binary: the raw bytes)
        raw = 1 if options.input_dtype == InputDtype.uint8 else 4
        self.wire_bytes_per_value = raw + (raw if self.binary else 3 * raw)
        self.description: dict[str, Any] = {
            "protocol": "kserve-v2",
            "url": identity_url(url, transport.auth),
            "model": unquote(m.group(2)),  # as the server reads it: %6C is l
            "version": m.group(4) and unquote(m.group(4)),
            "input_name": options.input_name,
            "layout": options.input_layout,
            "dtype": options.input_dtype,
            "scale": self.input.wire_scale,
            **self.input.describe(),
            "output": options.output,
            "clip": [0.0, 1.0],  # noisy pixels are clipped (and rounded for uint8) on the way
        }
        self.fingerprint = fingerprint(self.description)

    def _input(self, images: torch.Tensor) -> tuple[dict[str, Any], np.ndarray]:
        o = self.options
        assert o.input_dtype is not None  # resolved when the adapter was built
        pixels = self.input.apply(images)
        tensor = {"name": o.input_name, "shape": list(pixels.shape)}
        return {**tensor, "datatype": _WIRE_DTYPE[o.input_dtype]}, pixels

    def request(self, images: torch.Tensor) -> dict[str, Any]:
        """The JSON request: the tensor's values as a flat list."""
        tensor, pixels = self._input(images)
        body: dict[str, Any] = {"inputs": [{**tensor, "data": pixels.reshape(-1)}]}
        if self.options.output:
            body["outputs"] = [{"name": self.options.output}]
        return body

    def binary_request(self, images: torch.Tensor) -> tuple[bytes, int]:
        """The binary tensor extension's request: (body, its JSON header's length); the body
        is the header, then the tensor's raw bytes."""
        tensor, pixels = self._input(images)
        raw = np.ascontiguousarray(pixels, _RAW[tensor["datatype"]]).data.cast("B")
        tensor["parameters"] = {"binary_data_size": len(raw)}
        header: dict[str, Any] = {"inputs": [tensor], "parameters": {"binary_data_output": True}}
        if self.options.output:
            header["outputs"] = [{"name": self.options.output, "parameters": {"binary_data": True}}]
        head = orjson.dumps(header)
        return head + raw, len(head)

    def _output(self, body: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The output tensor to read, and all outputs in order (binary data follows it)."""
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
            return chosen[0], outputs
        return outputs[0], outputs

    @staticmethod
    def _shape(tensor: dict[str, Any]) -> tuple[str, list[int]]:
        dtype, shape = tensor.get("datatype"), tensor.get("shape")
        what = f"output {server_text(tensor.get('name'), 60)!r}"
        if dtype not in _NUMERIC:
            raise ProtocolError(f"{what} has non-numeric datatype {server_text(dtype, 60)!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ProtocolError(f"{what} has no valid shape")
        if len(shape) > 2:
            raise ProtocolError(f"{what} has {len(shape)} dimensions; expected N×K or N")
        return what, shape

    def parse(self, body: Any, n: int) -> Answer:
        """A JSON answer: the output's values as a flat list."""
        tensor, _ = self._output(body)
        what, shape = self._shape(tensor)
        data = tensor.get("data")
        if not isinstance(data, list) or math.prod(shape) != len(data):
            raise ProtocolError(f"{what} data does not fit its shape")
        try:
            arr = np.asarray(data, dtype=np.float64).reshape(shape)
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"{what} data is not a flat list of numbers") from e
        return Answer.from_output(arr, n, what)

    def parse_reply(self, reply: Reply, n: int) -> Answer:
        """A binary answer (a JSON header of the length the header field gives, then each
        binary output's bytes in order), or a JSON one from a server that answered in JSON."""
        length = reply.headers.get(HEADER)
        if length is None:
            return self.parse(parse_json_body(reply.content), n)
        if not length.isdigit() or int(length) > len(reply.content):
            raise ProtocolError(f"{HEADER} {server_text(length, 20)!r} does not fit the answer")
        size = int(length)
        body = parse_json_body(reply.content[:size])
        tensor, outputs = self._output(body)
        if not isinstance(tensor.get("parameters"), dict) or (
            "binary_data_size" not in tensor["parameters"]
        ):
            return self.parse(body, n)  # this output came as JSON data
        offset = size
        for t in outputs:
            given = t.get("parameters")
            bytes_ = given.get("binary_data_size") if isinstance(given, dict) else None
            if bytes_ is None:
                continue
            if not (isinstance(bytes_, int) and 0 <= bytes_ <= len(reply.content) - offset):
                raise ProtocolError("binary_data_size does not fit the answer's bytes")
            if t is tensor:
                break
            offset += bytes_
        what, shape = self._shape(tensor)
        dtype = np.dtype(_RAW[tensor["datatype"]])
        if bytes_ != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"{what} has {bytes_} bytes for shape {shape}")
        raw = np.frombuffer(reply.content, dtype, math.prod(shape), offset)
        return Answer.from_output(raw.astype(np.float64).reshape(shape), n, what)

    async def classify(self, images: torch.Tensor) -> Answer:
        n = len(images)
        # built off the event loop: at 224×224 a request's values take tens of milliseconds
        if not self.binary:
            request = await asyncio.to_thread(self.request, images)
            return await self.transport.post_json(self.url, request, lambda b: self.parse(b, n))
        body, header = await asyncio.to_thread(self.binary_request, images)
        return await self.transport.post_reply(
            self.url,
            body,
            "application/octet-stream",
            lambda reply: self.parse_reply(reply, n),
            headers={HEADER: str(header)},
        )

    async def aclose(self) -> None:
        await self.transport.aclose()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
