"""Every identity bbsmooth computes: sha256 of a canonical description, a file, an image or a
module's weights. Cache keys, fingerprints and run configs are built from these."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from .errors import UsageError
from .inputs import open_regular


def fingerprint(description: Any) -> str:
    """sha256 of a canonical JSON description, a dict or a list (no secrets may be put in
    it)."""
    blob = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: str, what: str = "file") -> str:
    """sha256 of a regular file's content; a FIFO or device is refused, never waited on."""
    h = hashlib.sha256()
    fd = open_regular(path, what)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UsageError(f"{what} {path} could not be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return h.hexdigest()


def image_digest(x: np.ndarray | torch.Tensor) -> str:
    """sha256 of an image's shape and float32 values: its identity in seeds and cache keys."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.tobytes())
    return h.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names and values): the identity of its weights, for a
    front end or a LoRA base model."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
