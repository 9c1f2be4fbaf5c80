"""What goes on the wire for APIs that take image files: PNG (lossless) or JPEG.

Encoding happens after the noise, so it is part of the base classifier (and of the
fingerprint) and the certificate stays valid. Images are sent at the size where the noise was
added: an image over the vendor's limit is an error, never silently re-scaled on the way.
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..options import InputDtype
from .modelinput import ModelInput

PIXELS = ModelInput(dtype=InputDtype.uint8)  # clipped to [0,1], rounded to 8 bits


Format = Literal["png", "jpeg"]
MIME = {"png": "image/png", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Encoding:
    format: Format = "png"
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.format not in MIME:
            raise UsageError(f"--encoding {self.format!r} is unknown: use png or jpeg")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be 1..100, got {self.jpeg_quality}")

    @property
    def mime(self) -> str:
        return MIME[self.format]

    def describe(self) -> dict[str, Any]:
        quality = self.jpeg_quality if self.format == "jpeg" else None
        return {"encoding": self.format, "jpeg_quality": quality, "pixels": "uint8 after clip"}

    def encode(
        self, images: torch.Tensor, limit: int | None = None, vendor: str = ""
    ) -> list[bytes]:
        """N noisy C×H×W images → N files: clipped to [0,1], rounded to 8 bits, encoded."""
        pixels = PIXELS.apply(images)
        if len(pixels) == 1:
            files = [self._encode_one(pixels[0])]
        else:  # a batch: spread over threads (the encoders release the GIL)
            files = list(_pool().map(self._encode_one, pixels))
        if limit is not None:
            for data in files:
                if len(data) > limit:
                    raise UsageError(
                        f"an encoded image is {len(data):,} bytes, over {vendor}'s limit of "
                        f"{limit:,}: resize the images (--size HxW) or use --encoding jpeg"
                    )
        return files

    def _encode_one(self, pixels: np.ndarray) -> bytes:
        channels = pixels.shape[0]
        if channels == 1:
            image = Image.fromarray(pixels[0], mode="L")
        elif channels == 3:
            image = Image.fromarray(pixels.transpose(1, 2, 0), mode="RGB")
        else:
            raise UsageError(
                f"cannot encode {channels}-channel images as {self.format}: use 1 or 3"
            )
        out = io.BytesIO()
        if self.format == "png":
            # stored, not deflated: noise leaves little to compress (level 1 saved 5-16% at
            # 224×224 for twice the CPU), and the decoded pixels are the same either way
            image.save(out, format="PNG", compress_level=0)
        else:
            image.save(out, format="JPEG", quality=self.jpeg_quality)
        return out.getvalue()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), "bbsmooth-encode")
