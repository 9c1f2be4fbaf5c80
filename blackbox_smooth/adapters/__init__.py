"""How a query reaches a classifier: one module per protocol, all answering `Answer`s.

`open_blackbox("python:model.py:predict" | "torch:model.pt" | "http://…/v2/models/m/infer" |
"https://…/predictions/m" | "https://vision.googleapis.com/v1/images:annotate" | …)`; for an
HTTP URL `--protocol` picks the adapter, or the URL's shape does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch

from ..blackbox import OTHER, Answer, BlackBox
from ..digests import fingerprint
from ..endpoint import HTTP_PREFIXES, Endpoint, Kind
from ..errors import UsageError, warn
from ..options import EndpointOptions
from ..redaction import printable, redact_url
from .auth import Auth
from .encoding import Encoding
from .gcv import CloudVision
from .generic import Generic, VendorConfig
from .http import HttpTransport, RetryPolicy
from .huggingface import HuggingFace
from .kserve import KServe, KServeOptions, is_kserve_url
from .labels import LabelMap
from .local import PythonFunction, TorchModel
from .modelinput import ModelInput
from .torchserve import TorchServe
from .urls import identity_url, is_loopback_name

__all__ = [
    "OTHER",
    "Answer",
    "BlackBox",
    "EndpointOptions",
    "Auth",
    "Encoding",
    "HttpTransport",
    "KServe",
    "KServeOptions",
    "LabelMap",
    "PythonFunction",
    "RetryPolicy",
    "TorchModel",
    "fingerprint",
    "open_blackbox",
]

_HF_HOSTS = ("api-inference.huggingface.co", "router.huggingface.co")


def detect_protocol(url: str) -> str | None:
    """The protocol a URL's shape implies, or None."""
    parts = urlsplit(url)
    host, path = (parts.hostname or "").lower(), parts.path
    if is_kserve_url(url):
        return "kserve"
    if host == "vision.googleapis.com" or path.endswith("images:annotate"):
        return "gcv"
    if host in _HF_HOSTS or host.endswith(".endpoints.huggingface.cloud"):
        return "huggingface"
    if "/predictions/" in path:
        return "torchserve"
    return None


TENSOR_INPUT = (
    "preset", "input_layout", "input_dtype", "input_scale", "input_mean", "input_std",
    "channel_order",
)  # fmt: skip


def model_input(options: EndpointOptions) -> ModelInput | None:
    """The --input-* flags as a ModelInput for a local torch model; None when none is given."""
    if all(getattr(options, name) is None for name in TENSOR_INPUT):
        return None
    return ModelInput.of(options)


def _given(options: EndpointOptions, names: tuple[str, ...]) -> str | None:
    """The flag of the first of `names` the user gave (not left at None), or None."""
    name = next((n for n in names if getattr(options, n) is not None), None)
    return None if name is None else "--" + name.replace("_", "-")


def _no_tensor_input(options: EndpointOptions, endpoint: str) -> None:
    if flag := _given(options, TENSOR_INPUT):
        raise UsageError(
            f"{flag} describes a model's input tensor: it applies to onnx:, torch: and Open "
            f"Inference Protocol endpoints, not to {endpoint}; drop it"
        )


# what only an http(s) endpoint reads: given for a local model, it would be silently ignored
HTTP_ONLY = ("protocol", "protocol_config", "labels", "top_k", "auth", "ca_bundle")


@dataclass(frozen=True)
class Opening:
    """What opening an endpoint may take besides its options."""

    device: torch.device
    adapter: str | None = None  # a LoRA run inside a torch:FILE.py:FUNC model
    httpx_transport: httpx.AsyncBaseTransport | None = None  # in place of sockets (tests)


def _python(endpoint: Endpoint, options: EndpointOptions, how: Opening) -> BlackBox:
    _no_tensor_input(options, "python: functions (they get [0,1] float32 arrays)")
    return PythonFunction(endpoint.target, max_batch=options.batch or 1024)


def _torch_function(endpoint: Endpoint, options: EndpointOptions, how: Opening) -> BlackBox:
    return TorchModel.from_function(
        endpoint.target, how.device, options.batch or 1024, how.adapter, model_input(options)
    )


def _torchscript(endpoint: Endpoint, options: EndpointOptions, how: Opening) -> BlackBox:
    batch = options.batch or 1024
    return TorchModel.from_torchscript(endpoint.target, how.device, batch, model_input(options))


def _onnx(endpoint: Endpoint, options: EndpointOptions, how: Opening) -> BlackBox:
    from .onnx import OnnxModel  # onnxruntime loads only for an onnx: endpoint

    return OnnxModel(endpoint.target, how.device, options)


def _http(endpoint: Endpoint, options: EndpointOptions, how: Opening) -> BlackBox:
    return open_http(endpoint.target, options, httpx_transport=how.httpx_transport)


# Which adapter opens each kind of endpoint (endpoint.py spells the kinds): one row each.
OPENERS: dict[Kind, Callable[[Endpoint, EndpointOptions, Opening], BlackBox]] = {
    Kind.python: _python,
    Kind.torch_function: _torch_function,
    Kind.torchscript: _torchscript,
    Kind.onnx: _onnx,
    Kind.http: _http,
}


def open_blackbox(
    spec: str | Endpoint,
    options: EndpointOptions | None = None,
    device: torch.device | None = None,
    adapter: str | None = None,
    *,
    httpx_transport: httpx.AsyncBaseTransport | None = None,
) -> BlackBox:
    """The black box `spec` names, opened with `options` (the wire) on `device`; `adapter`: a
    LoRA run inside a torch:FILE.py:FUNC model; `httpx_transport` replaces the sockets of an
    HTTP endpoint (tests speak to a protocol in process)."""
    endpoint = Endpoint.parse(spec)
    options = options or EndpointOptions()
    if options.endpoint_id is not None and not endpoint.remote:
        raise UsageError(
            "--endpoint-id names an http(s) endpoint; a local model is known by its file's "
            "digest wherever it lies: drop it"
        )
    if not endpoint.remote and (flag := _given(options, HTTP_ONLY)):
        raise UsageError(
            f"{flag} says how to speak to an http(s) endpoint; {endpoint.shown} is a local "
            "model, which answers class indices or scores itself: drop it"
        )
    if adapter is not None and endpoint.kind != Kind.torch_function:
        raise UsageError("--adapter needs a local model given as torch:FILE.py:FUNC")
    how = Opening(device or torch.device("cpu"), adapter, httpx_transport)
    return OPENERS[endpoint.kind](endpoint, options, how)


def open_http(
    url: str,
    options: EndpointOptions,
    *,
    httpx_transport: httpx.AsyncBaseTransport | None = None,
) -> BlackBox:
    """`httpx_transport` replaces the sockets (tests speak to a protocol in process)."""
    box = _open_http(url, options, httpx_transport)
    if options.endpoint_id is not None:  # the user vouches: the same model as at that address
        named = options.endpoint_id
        if named.startswith(HTTP_PREFIXES):
            check_url(named, options.api_key_env)
            named = identity_url(named)
        box.description = {**box.description, "url": named}
        box.fingerprint = fingerprint(box.description)
    return box


def _kserve(url: str, transport: HttpTransport, options: EndpointOptions, _: Any) -> BlackBox:
    if options.labels:
        raise UsageError("the Open Inference Protocol answers class indices: drop --labels")
    wire = KServeOptions(
        input_layout=options.input_layout,
        input_dtype=options.input_dtype,
        input_scale=options.input_scale,
        input_name=options.input_name,
        output=options.output,
        input_mean=options.input_mean,
        input_std=options.input_std,
        channel_order=options.channel_order,
    )
    return KServe(url, transport, wire, batch=options.batch)


def _gcv(url: str, transport: HttpTransport, options: EndpointOptions, _: Any) -> BlackBox:
    return CloudVision(
        url,
        transport,
        labels=_labels(options),
        encoding=_encoding(options),
        max_batch=options.batch or 16,
        max_results=options.top_k or 10,
    )


def _huggingface(url: str, transport: HttpTransport, options: EndpointOptions, _: Any) -> BlackBox:
    encoding, labels = _encoding(options), _labels(options)
    return HuggingFace(url, transport, labels=labels, encoding=encoding, top_k=options.top_k)


def _torchserve(url: str, transport: HttpTransport, options: EndpointOptions, _: Any) -> BlackBox:
    return TorchServe(url, transport, labels=_labels(options), encoding=_encoding(options))


def _generic(url: str, transport: HttpTransport, options: EndpointOptions, config: Any) -> BlackBox:
    labels, encoding = _labels(options), _encoding(options)
    assert config is not None and options.protocol_config is not None
    where = str(options.protocol_config)
    return Generic(url, transport, config, where, labels=labels, encoding=encoding)


def _labels(options: EndpointOptions) -> LabelMap | None:
    return LabelMap.load(str(options.labels)) if options.labels else None


def _encoding(options: EndpointOptions) -> Encoding:
    return Encoding(options.encoding.value, options.jpeg_quality)


@dataclass(frozen=True)
class HttpProtocol:
    """One row of the HTTP protocols: how its adapter is built, the key's usual place, and
    what it takes (image files or tensors; several images per request or one)."""

    open: Callable[[str, HttpTransport, EndpointOptions, Any], BlackBox]
    auth: str = "bearer"
    files: bool = True  # takes image files (not a tensor: no --input-* flags)
    batched: bool = False  # several images per request
    top_k: bool = False  # the API caps the labels per answer (--top-k)


HTTP_PROTOCOLS: dict[str, HttpProtocol] = {  # a row for each value of options.Protocol
    "kserve": HttpProtocol(_kserve, files=False, batched=True),
    "huggingface": HttpProtocol(_huggingface, top_k=True),
    "torchserve": HttpProtocol(_torchserve),
    "gcv": HttpProtocol(_gcv, auth="query:key", batched=True, top_k=True),
    "generic": HttpProtocol(_generic),
}


def _open_http(
    url: str, options: EndpointOptions, httpx_transport: httpx.AsyncBaseTransport | None
) -> BlackBox:
    check_url(url, options.api_key_env)
    if options.max_response_bytes < 1024:
        raise UsageError(f"--max-response-bytes must be >= 1024, got {options.max_response_bytes}")
    chosen = options.protocol.value if options.protocol else None  # a plain string from here
    name = chosen or ("generic" if options.protocol_config else None) or detect_protocol(url)
    if name is None:
        raise UsageError(
            f"cannot tell the protocol of {redact_url(url)} from its address: add --protocol "
            f"{'|'.join(HTTP_PROTOCOLS)} (generic with --protocol-config FILE)"
        )
    protocol = HTTP_PROTOCOLS[name]
    config = None
    if name == "generic":
        if options.protocol_config is None:
            raise UsageError("--protocol generic needs --protocol-config FILE (see the README)")
        config = VendorConfig.load(str(options.protocol_config))
    if protocol.files:
        _no_tensor_input(options, f"{name} endpoints (they take image files)")
        if options.top_k is not None and not protocol.top_k:
            raise UsageError(f"--top-k applies to Hugging Face and Cloud Vision, not {name}")
        if options.batch not in (None, 1) and not protocol.batched:
            raise UsageError(f"{name} takes one image per request: drop --batch")
    default_auth = config.auth if config else protocol.auth
    transport = _transport(url, options, config, default_auth, httpx_transport)
    return protocol.open(url, transport, options, config)


def _transport(
    url: str,
    options: EndpointOptions,
    config: VendorConfig | None,
    default_auth: str,
    httpx_transport: httpx.AsyncBaseTransport | None,
) -> HttpTransport:
    if options.ca_bundle is not None and not os.path.isfile(options.ca_bundle):
        raise UsageError(f"--ca-bundle {options.ca_bundle} is not a file")
    auth = Auth(options.auth or default_auth, options.api_key_env)
    host = urlsplit(url).hostname or ""
    if auth.key and urlsplit(url).scheme == "http" and not is_loopback_name(host):
        warn(
            f"the API key in ${options.api_key_env} travels unencrypted to {host} (http://): "
            "anyone on the way can read it; use https:// if the server offers it"
        )
    return HttpTransport(
        concurrency=options.concurrency,
        timeout=options.timeout,
        rps=options.rps,
        retry=RetryPolicy(options.retries, options.backoff, options.max_backoff),
        auth=auth,
        verify=str(options.ca_bundle) if options.ca_bundle is not None else True,
        headers=dict(config.headers) if config else None,
        max_response_bytes=options.max_response_bytes,
        httpx_transport=httpx_transport,
    )


def check_url(url: str, api_key_env: str) -> None:
    """A URL httpx can send to, with a host and a valid port, and no credentials in it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError when out of range
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        raise UsageError(
            f"the endpoint URL {redact_url(url)} is not valid: {printable(str(e))}"
        ) from None
    if not parts.hostname:
        raise UsageError(f"the endpoint URL {redact_url(url)} has no host")
    if parts.username or parts.password:
        raise UsageError(
            f"the endpoint URL {redact_url(url)} holds credentials: remove them and put the key in "
            f"${api_key_env} (see --auth)"
        )
