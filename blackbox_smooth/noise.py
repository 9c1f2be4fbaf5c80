"""Reproducible Gaussian noise streams.

The noise for one image is an infinite stream of samples δ_i ~ N(0, σ²I), cut into blocks of a
fixed size that depends only on the image's shape. Each block has its own generator seed, derived
from (seed, image digest, region, block index), so the same seed gives the same noise whatever
the batch size, the concurrency or the order in which blocks are drawn. A region names a disjoint
part of the stream: CERTIFY's selection samples come from "selection", its estimation samples
from "estimation" (rule 1 of DESIGN.md: the two never overlap).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SELECTION = "selection"
ESTIMATION = "estimation"

# A block holds at most this many float32 values (64 MiB) and at most MAX_BLOCK samples, so a
# 28×28 digit gets blocks of 1,024 samples and a 224×224 RGB photo blocks of 111.
BLOCK_ELEMENTS = 2**24
MAX_BLOCK = 1024


def block_size(shape: tuple[int, ...]) -> int:
    """Samples per block for images of this shape."""
    return max(1, min(MAX_BLOCK, BLOCK_ELEMENTS // math.prod(shape)))


def image_digest(x: np.ndarray | torch.Tensor) -> str:
    """sha256 of an image's shape and float32 values: its identity in seeds and cache keys."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.tobytes())
    return h.hexdigest()


def block_seed(seed: int, digest: str, region: str, index: int) -> int:
    material = f"bbsmooth-noise-v1|{seed}|{digest}|{region}|{index}".encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & (2**63 - 1)


class NoiseStream:
    """The noise δ_i of one image: `block(region, b)` is samples [b·B, (b+1)·B) of that region."""

    def __init__(
        self, shape: tuple[int, ...], sigma: float, seed: int, digest: str, device: torch.device
    ) -> None:
        self.shape = tuple(shape)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.digest = digest
        self.device = device
        self.block_size = block_size(self.shape)

    def blocks(self, n: int) -> list[tuple[int, int]]:
        """(block index, samples used from that block) covering the first n samples of a region."""
        full, rest = divmod(n, self.block_size)
        out = [(b, self.block_size) for b in range(full)]
        if rest:
            out.append((full, rest))
        return out

    def block(self, region: str, index: int, count: int | None = None) -> torch.Tensor:
        """σ·N(0, I) in float32 on the device, shape (count or B, *shape)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(block_seed(self.seed, self.digest, region, index))
        z = torch.randn(
            (self.block_size, *self.shape), generator=gen, device=self.device, dtype=torch.float32
        )
        z = z[:count] if count is not None else z
        return z.mul_(self.sigma)
