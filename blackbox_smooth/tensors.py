"""Tensors of an Open Inference Protocol request, read as a hostile client would send them:
every malformed tensor is one UsageError line (a 400), never a 200 on nonsense. Both of our
servers read their inputs here: `bbsmooth serve` (any numeric datatype, as the model takes
it) and `bbsmooth proxy` (pixels on the [0, 1] scale, or 0..255 as UINT8)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import UsageError

LABEL, RADIUS = "label", "radius"  # the outputs the proxy's infer route answers
# What each datatype may hold: float types their finite range, integer types their range.
DATATYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8,
    "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
}  # fmt: skip
PIXELS = ("FP32", "FP64", "FP16", "UINT8")  # what an image may come as


def images_of(
    body: Any,
    max_batch: int,
    max_values: int,
    shape: tuple[int, ...] | None,
    *,
    outputs: tuple[str, ...] = (LABEL, RADIUS),
    datatypes: tuple[str, ...] = PIXELS,
    unit_range: bool = True,
) -> np.ndarray:
    """N×C×H×W float32 from the request's one input: shape [C, H, W] (one image) or
    [N, C, H, W], every value finite and within its datatype; UINT8 is divided by 255. With
    `unit_range`, float values must lie in [0, 1]. `outputs` are the names a request may ask."""
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
        unknown = [n for n in names if n not in outputs]
        if unknown:
            raise UsageError(f"unknown output {str(unknown[0])[:60]!r}: this model answers "
                             f"{', '.join(map(repr, outputs))}")  # fmt: skip
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
    if datatype not in datatypes:
        raise UsageError(
            f"datatype must be one of {', '.join(datatypes)}, got {str(datatype)[:20]!r}"
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
    kind: Any = np.dtype(DATATYPES[datatype])
    integer = np.issubdtype(kind, np.integer)
    if integer:
        low, high = np.iinfo(kind).min, np.iinfo(kind).max
        if np.any(values < low) or np.any(values > high) or np.any(values != np.round(values)):
            raise UsageError(f"{datatype} values must be whole numbers in {low}..{high}")
    elif np.any(np.abs(values) > float(np.finfo(kind).max)):
        raise UsageError(f"a value beyond what {datatype} holds (±{np.finfo(kind).max:.4g})")
    if datatype == "UINT8":
        values = values / 255.0
    elif (
        unit_range
        and not np.issubdtype(kind, np.integer)
        and not np.all((values >= 0) & (values <= 1))
    ):
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
