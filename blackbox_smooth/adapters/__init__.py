"""How a query reaches a classifier: one module per protocol, all answering `Answer`s.

`open_blackbox("python:model.py:predict" | "torch:model.pt" | "http://…/v2/models/m/infer")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from .base import OTHER, Answer, BlackBox, fingerprint
from .http import HttpTransport, RetryPolicy, redact
from .kserve import KServe, KServeOptions, is_kserve_url
from .local import PythonFunction, TorchModel

__all__ = [
    "OTHER",
    "Answer",
    "BlackBox",
    "EndpointOptions",
    "HttpTransport",
    "KServe",
    "KServeOptions",
    "PythonFunction",
    "RetryPolicy",
    "TorchModel",
    "fingerprint",
    "open_blackbox",
]

SCHEMES = (
    "python:FILE.py:FUNC, python:package.module:FUNC, torch:FILE.pt, torch:FILE.py:FUNC, "
    "http(s)://HOST/v2/models/NAME/infer"
)


@dataclass(frozen=True)
class EndpointOptions:
    batch: int | None = None  # images per request; None: the adapter's default
    concurrency: int = 16
    rps: float | None = None
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    kserve: KServeOptions = field(default_factory=KServeOptions)


def open_blackbox(
    spec: str,
    options: EndpointOptions | None = None,
    device: torch.device | None = None,
    adapter: str | None = None,
) -> BlackBox:
    options = options or EndpointOptions()
    device = device or torch.device("cpu")
    if options.batch is not None and options.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {options.batch}")
    if spec.startswith("python:"):
        return PythonFunction(spec.removeprefix("python:"), max_batch=options.batch or 1024)
    if adapter is not None and not (spec.startswith("torch:") and ".py:" in spec):
        raise UsageError("--adapter needs a local model given as torch:FILE.py:FUNC")
    if spec.startswith("torch:") and ".py:" in spec:
        return TorchModel.from_function(
            spec.removeprefix("torch:"), device, options.batch or 1024, adapter
        )
    if spec.startswith("torch:"):
        return TorchModel.from_torchscript(
            spec.removeprefix("torch:"), device, max_batch=options.batch or 1024
        )
    if spec.startswith(("http://", "https://")):
        if not is_kserve_url(spec):
            raise UsageError(
                f"unknown HTTP endpoint {redact(spec)}: only the Open Inference Protocol "
                "(…/v2/models/NAME/infer) is supported so far"
            )
        transport = HttpTransport(
            concurrency=options.concurrency,
            timeout=options.timeout,
            rps=options.rps,
            retry=options.retry,
        )
        return KServe(spec, transport, options.kserve, max_batch=options.batch or 64)
    raise UsageError(f"unknown endpoint {redact(spec)!r}: use one of {SCHEMES}")
