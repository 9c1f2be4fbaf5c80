"""How a query reaches a classifier: one module per protocol, all answering `Answer`s.

`open_blackbox("python:model.py:predict" | "torch:model.pt" | "http://…/v2/models/m/infer" |
"https://…/predictions/m" | "https://vision.googleapis.com/v1/images:annotate" | …)`; for an
HTTP URL `--protocol` picks the adapter, or the URL's shape does.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import httpx
import torch

from ..blackbox import OTHER, Answer, BlackBox
from ..digests import fingerprint
from ..errors import UsageError, warn
from ..options import ENDPOINT_SCHEMES, EndpointOptions, Protocol
from ..redaction import printable
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
from .urls import identity_url, is_loopback_name, redact_url

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

PROTOCOLS = tuple(p.value for p in Protocol)
DEFAULT_AUTH = {"gcv": "query:key"}  # the others take a bearer token
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


def _no_tensor_input(options: EndpointOptions, endpoint: str) -> None:
    given = [name for name in TENSOR_INPUT if getattr(options, name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(
            f"{flag} describes a model's input tensor: it applies to onnx:, torch: and Open "
            f"Inference Protocol endpoints, not to {endpoint}; drop it"
        )


def open_blackbox(
    spec: str,
    options: EndpointOptions | None = None,
    device: torch.device | None = None,
    adapter: str | None = None,
    *,
    httpx_transport: httpx.AsyncBaseTransport | None = None,
) -> BlackBox:
    options = options or EndpointOptions()
    device = device or torch.device("cpu")
    if options.endpoint_id is not None and not spec.startswith(("http://", "https://")):
        raise UsageError(
            "--endpoint-id names an http(s) endpoint; a local model is known by its file's "
            "digest wherever it lies: drop it"
        )
    if spec.startswith("python:"):
        _no_tensor_input(options, "python: functions (they get [0,1] float32 arrays)")
        return PythonFunction(spec.removeprefix("python:"), max_batch=options.batch or 1024)
    if adapter is not None and not (spec.startswith("torch:") and ".py:" in spec):
        raise UsageError("--adapter needs a local model given as torch:FILE.py:FUNC")
    if spec.startswith("torch:") and ".py:" in spec:
        return TorchModel.from_function(
            spec.removeprefix("torch:"),
            device,
            options.batch or 1024,
            adapter,
            model_input(options),
        )
    if spec.startswith("torch:"):
        return TorchModel.from_torchscript(
            spec.removeprefix("torch:"), device, options.batch or 1024, model_input(options)
        )
    if spec.startswith("onnx:"):
        from .onnx import OnnxModel  # onnxruntime loads only for an onnx: endpoint

        return OnnxModel(spec.removeprefix("onnx:"), device, options)
    if spec.startswith(("http://", "https://")):
        return open_http(spec, options, httpx_transport=httpx_transport)
    raise UsageError(f"unknown endpoint {redact_url(spec)!r}: use one of {ENDPOINT_SCHEMES}")


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
        if named.startswith(("http://", "https://")):
            check_url(named, options.api_key_env)
            named = identity_url(named)
        box.description = {**box.description, "url": named}
        box.fingerprint = fingerprint(box.description)
    return box


def _open_http(
    url: str, options: EndpointOptions, httpx_transport: httpx.AsyncBaseTransport | None
) -> BlackBox:
    check_url(url, options.api_key_env)
    if options.max_response_bytes < 1024:
        raise UsageError(f"--max-response-bytes must be >= 1024, got {options.max_response_bytes}")
    chosen = options.protocol.value if options.protocol else None  # a plain string from here
    protocol = chosen or ("generic" if options.protocol_config else None)
    protocol = protocol or detect_protocol(url)
    if protocol is None:
        raise UsageError(
            f"cannot tell the protocol of {redact_url(url)} from its address: add --protocol "
            f"{'|'.join(PROTOCOLS)} (generic with --protocol-config FILE)"
        )
    config = None
    if protocol == "generic":
        if options.protocol_config is None:
            raise UsageError("--protocol generic needs --protocol-config FILE (see the README)")
        config = VendorConfig.load(str(options.protocol_config))
    if options.ca_bundle is not None and not os.path.isfile(options.ca_bundle):
        raise UsageError(f"--ca-bundle {options.ca_bundle} is not a file")
    ca_bundle = None if options.ca_bundle is None else str(options.ca_bundle)
    default_auth = config.auth if config else DEFAULT_AUTH.get(protocol, "bearer")
    auth = Auth(options.auth or default_auth, options.api_key_env)
    host = urlsplit(url).hostname or ""
    if auth.key and urlsplit(url).scheme == "http" and not is_loopback_name(host):
        warn(
            f"the API key in ${options.api_key_env} travels unencrypted to {host} (http://): "
            "anyone on the way can read it; use https:// if the server offers it"
        )
    transport = HttpTransport(
        concurrency=options.concurrency,
        timeout=options.timeout,
        rps=options.rps,
        retry=RetryPolicy(options.retries, options.backoff, options.max_backoff),
        auth=auth,
        verify=ca_bundle or True,
        headers=dict(config.headers) if config else None,
        max_response_bytes=options.max_response_bytes,
        httpx_transport=httpx_transport,
    )
    if protocol == "kserve":
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
    _no_tensor_input(options, f"{protocol} endpoints (they take image files)")
    labels = LabelMap.load(str(options.labels)) if options.labels else None
    encoding = Encoding(options.encoding.value, options.jpeg_quality)
    if options.top_k is not None and protocol not in ("gcv", "huggingface"):
        raise UsageError(f"--top-k applies to Hugging Face and Cloud Vision, not {protocol}")
    if protocol == "gcv":
        return CloudVision(
            url,
            transport,
            labels=labels,
            encoding=encoding,
            max_batch=options.batch or 16,
            max_results=options.top_k or 10,
        )
    if options.batch not in (None, 1):
        raise UsageError(f"{protocol} takes one image per request: drop --batch")
    if protocol == "huggingface":
        return HuggingFace(url, transport, labels=labels, encoding=encoding, top_k=options.top_k)
    if protocol == "torchserve":
        return TorchServe(url, transport, labels=labels, encoding=encoding)
    assert config is not None and options.protocol_config is not None
    return Generic(
        url, transport, config, str(options.protocol_config), labels=labels, encoding=encoding
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
