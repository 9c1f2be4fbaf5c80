"""Reproducible Gaussian noise streams.

The noise for one image is an infinite stream of samples δ_i ~ N(0, σ²I), cut into blocks of a
fixed size that depends only on the image's shape. Clopper–Pearson needs the samples of one
certificate to be independent draws; two rules keep them so:

- Selection and estimation samples never overlap: CERTIFY's selection samples come from region
  "selection", its estimation samples from region "estimation", two separate streams.
- Each block is seeded from the full digest: block b of a region has its own counter-based
  generator (Philox4×64) keyed by all 256 bits of sha256(seed, image digest, region, b), so two
  blocks share a stream only if sha256 collides, and a block's noise does not depend on the
  batch size, the concurrency or the order in which blocks are drawn.

Noise is drawn in float64 with an exact Gaussian tail, added to the image in float64 and rounded
once to float32, the model's dtype: that rounding is part of the base classifier, as clipping
is. It is drawn on the CPU and then moved, so CPU and CUDA runs see the same noisy images.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SELECTION = "selection"
ESTIMATION = "estimation"

# Part of every cache key: answers to noise drawn any other way are never mixed with these.
NOISE_VERSION = "philox-f64-v2"

# A block holds at most this many values (128 MiB of float64 while drawn) and at most MAX_BLOCK
# samples, so a 28×28 digit gets blocks of 1,024 samples and a 224×224 RGB photo blocks of 111.
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


def block_key(seed: int, digest: str, region: str, index: int) -> int:
    """The 256-bit key of one block: the whole sha256 of (seed, image digest, region, index)."""
    material = f"bbsmooth-noise-v2|{seed}|{digest}|{region}|{index}".encode()
    return int.from_bytes(hashlib.sha256(material).digest(), "little")


def block_generator(key: int) -> np.random.Generator:
    """Philox4×64 for one block, using every bit of its 256-bit key: the low 128 bits are the
    Philox key, the high 128 the high half of the starting counter (the low half counts the
    draws from 0, and a block takes far fewer than its 2¹²⁸ steps)."""
    philox_key = key & (2**128 - 1)
    counter = (key >> 128) << 128
    return np.random.Generator(np.random.Philox(key=philox_key, counter=counter))


def standard_normal(gen: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, I) in float64, drawn in order from the generator's stream.

    numpy's float64 `standard_normal` is a 256-layer ziggurat (`random_standard_normal` in
    numpy/random/src/distributions/distributions.c): its base layer draws the tail beyond
    r ≈ 3.654 exactly, by Marsaglia's exponential rejection on 53-bit uniforms, so values past
    5.768σ come with their Gaussian probability. (torch's float32 CPU `randn` is Box–Muller on
    24-bit uniforms and never exceeds √(2·ln 2²⁴) ≈ 5.768σ.) It fills the array one value after
    another, so the first k samples drawn are a prefix of any longer draw."""
    return gen.standard_normal(shape, dtype=np.float64)


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

    def key(self, region: str, index: int) -> int:
        return block_key(self.seed, self.digest, region, index)

    def block(self, region: str, index: int, count: int | None = None) -> torch.Tensor:
        """σ·N(0, I) in float64 on the CPU, shape (count or B, *shape): the first `count`
        samples of the block, the same values whatever `count`."""
        count = self.block_size if count is None else count
        if not 0 <= count <= self.block_size:
            raise ValueError(f"a block has {self.block_size} samples, not {count}")
        z = standard_normal(block_generator(self.key(region, index)), (count, *self.shape))
        z *= self.sigma
        return torch.from_numpy(z)

    def noisy(
        self, x: torch.Tensor, region: str, index: int, count: int | None = None
    ) -> torch.Tensor:
        """x + δ_i for the first `count` samples of the block: added in float64 and rounded
        once to float32, the model's dtype, on the stream's device."""
        noisy = self.block(region, index, count).numpy()
        noisy += x.detach().cpu().numpy().astype(np.float64)
        return torch.from_numpy(noisy.astype(np.float32)).to(self.device)
