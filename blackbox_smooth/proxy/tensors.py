"""Images from an Open Inference Protocol request, checked as a hostile client would send them:
every malformed tensor is one UsageError line (a 400), never a 200 on nonsense."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import UsageError

LABEL, RADIUS = "label", "radius"  # the outputs the infer route answers
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8}


def images_of(
    body: Any, max_batch: int, max_values: int, shape: tuple[int, ...] | None
) -> np.ndarray:
    """N×C×H×W float32 on the [0,1] scale from the request's first input: FP32, FP64 or FP16
    values in [0, 1], or UINT8 in 0..255; shape [C, H, W] (one image) or [N, C, H, W]."""
    if not isinstance(body, dict):
        raise UsageError("the request must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise UsageError("'inputs' must be a list of one tensor: the images")
    wanted = body.get("outputs")
    if wanted is not None:
        names = (
            [o.get("name") if isinstance(o, dict) else o for o in wanted]
            if isinstance(wanted, list)
            else [wanted]
        )
        unknown = [n for n in names if n not in (LABEL, RADIUS)]
        if unknown:
            raise UsageError(f"unknown output {str(unknown[0])[:60]!r}: this model answers "
                             f"{LABEL!r} and {RADIUS!r}")  # fmt: skip
    tensor = inputs[0]
    dims = tensor.get("shape")
    if not isinstance(dims, list) or len(dims) not in (3, 4):
        raise UsageError("the input's 'shape' must be [C, H, W] or [N, C, H, W]")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise UsageError(f"the input's shape must be positive integers, got {str(dims)[:80]}")
    if len(dims) == 3:
        dims = [1, *dims]
    count = math.prod(dims)
    if dims[0] > max_batch:
        raise UsageError(f"{dims[0]} images in one request: at most {max_batch}")
    if count > max_values:
        raise UsageError(f"{count:,} values in one request: at most {max_values:,}")
    if shape is not None and tuple(dims[1:]) != shape:
        want = "×".join(map(str, shape))
        raise UsageError(f"images of {'×'.join(map(str, dims[1:]))}: this model takes {want}")
    datatype = tensor.get("datatype")
    if datatype not in DATATYPES:
        raise UsageError(
            f"datatype must be one of {', '.join(DATATYPES)}, got {str(datatype)[:20]!r}"
        )
    data = tensor.get("data")
    if not isinstance(data, list):
        raise UsageError("the input's 'data' must be a list of numbers")
    try:
        values = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise UsageError(
            "the input's 'data' must hold numbers only (a flat or nested list)"
        ) from None
    if values.size != count:
        raise UsageError(f"the input holds {values.size:,} values, its shape says {count:,}")
    if not np.all(np.isfinite(values)):
        raise UsageError("the input holds NaN or infinite values")
    if datatype == "UINT8":
        if np.any(values < 0) or np.any(values > 255) or np.any(values != np.round(values)):
            raise UsageError("UINT8 values must be whole numbers in 0..255")
        values = values / 255.0
    elif np.any(values < 0) or np.any(values > 1):
        raise UsageError(f"{datatype} pixels must be on the [0, 1] scale")
    return values.astype(np.float32).reshape(dims)


def infer_response(name: str, labels: list[int], radii: list[float]) -> dict[str, Any]:
    n = len(labels)
    return {
        "model_name": name,
        "outputs": [
            {"name": LABEL, "datatype": "INT64", "shape": [n], "data": labels},
            {"name": RADIUS, "datatype": "FP32", "shape": [n], "data": radii},
        ],
    }
