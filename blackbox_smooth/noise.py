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

Noise is drawn in float64 with a Gaussian tail, added to the image in float64 and rounded once
to float32, the model's dtype: that rounding is part of the base classifier, as clipping is.

Two generators, one per kind of device, each named in the cache key (`NoiseStream.version`):
- CPU: numpy's Philox4×64 keyed by all 256 bits, normals by numpy's float64 ziggurat (exact
  tail).
- CUDA: Philox4×32-10 written in exact int64 torch arithmetic, keyed by 160 bits of the block
  key, one counter per pair of values; normals by float64 Box–Muller on 53-bit uniforms (tail
  exact to 8.6σ, beyond which N(0, 1) puts 10⁻¹⁷ of its mass). It runs where the model runs, so
  noise is not the bottleneck of a GPU, and every value is a function of its index alone: the
  same on any GPU, whatever the batch. The two generators give different streams, so CPU and
  CUDA runs are different (equally valid) experiments, and their cache entries never mix.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

SELECTION = "selection"
ESTIMATION = "estimation"

# Part of every cache key: answers to noise drawn any other way are never mixed with these.
NOISE_VERSION = "philox-f64-v2"  # numpy Philox4×64 + ziggurat (CPU)
DEVICE_NOISE_VERSION = "philox4x32-bm-f64-v1"  # torch Philox4×32-10 + Box–Muller (CUDA)

# A block holds at most this many values (128 MiB of float64 while drawn) and at most MAX_BLOCK
# samples, so a 28×28 digit gets blocks of 1,024 samples and a 224×224 RGB photo blocks of 111.
BLOCK_ELEMENTS = 2**24
MAX_BLOCK = 1024
SUM_ELEMENTS = 2**20  # float64 values summed at a time on the CPU (8 MiB)


def block_size(shape: tuple[int, ...]) -> int:
    """Samples per block for images of this shape."""
    return max(1, min(MAX_BLOCK, BLOCK_ELEMENTS // math.prod(shape)))


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


# Philox4×32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of m·x for 32-bit m and x, without int64 overflow: x is split into
    16-bit halves so that no product exceeds 2⁴⁸."""
    a = (x >> 16) * m
    t = ((a & 0xFFFF) << 16) + (x & 0xFFFF) * m
    return (a >> 16) + (t >> 32), t & MASK32


def philox4x32(
    counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = 10
) -> tuple[torch.Tensor, ...]:
    """Philox4×32 on tensors of 32-bit words held in int64: the same bits on every device."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _uniform53(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """A float64 uniform on (0, 1) from two 32-bit words: 53 bits, centred in its cell so that
    it is never 0 (log) or 1."""
    bits = (high >> 5) * 2**26 + (low >> 6)
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


def device_normal(key: int, count: int, device: torch.device) -> torch.Tensor:
    """The first `count` values of one block's N(0, 1) stream on `device`, float64. Counter j
    (j < 2³²) with the key's other 96 bits as the high counter words gives values 2j and 2j+1
    by Box–Muller, so a shorter draw is a prefix of a longer one."""
    pairs = (count + 1) // 2
    assert pairs < 2**32
    words = [(key >> (32 * i)) & MASK32 for i in range(5)]
    c0 = torch.arange(pairs, dtype=torch.int64, device=device)
    high = [torch.full_like(c0, w) for w in words[2:5]]
    r0, r1, r2, r3 = philox4x32((c0, *high), (words[0], words[1]))
    radius = torch.sqrt(-2.0 * torch.log(_uniform53(r0, r1)))
    angle = (2 * math.pi) * _uniform53(r2, r3)
    z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
    return z.reshape(-1)[:count]


class NoiseStream:
    """The noise δ_i of one image: `block(region, b)` is samples [b·B, (b+1)·B) of that region.
    On a CUDA device the stream is drawn there by the device generator; elsewhere by numpy
    (`on_device` chooses explicitly: the tests run the device generator on the CPU)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        sigma: float,
        seed: int,
        digest: str,
        device: torch.device,
        on_device: bool | None = None,
    ) -> None:
        self.shape = tuple(shape)
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.digest = digest
        self.device = device
        self.block_size = block_size(self.shape)
        self.on_device = device.type == "cuda" if on_device is None else on_device
        self.version = DEVICE_NOISE_VERSION if self.on_device else NOISE_VERSION

    def blocks(self, n: int) -> list[tuple[int, int]]:
        """(block index, samples used from that block) covering the first n samples of a region."""
        full, rest = divmod(n, self.block_size)
        out = [(b, self.block_size) for b in range(full)]
        if rest:
            out.append((full, rest))
        return out

    def key(self, region: str, index: int) -> int:
        return block_key(self.seed, self.digest, region, index)

    def _count(self, count: int | None) -> int:
        """Samples of a block asked for: all of them by default, never more."""
        count = self.block_size if count is None else count
        if not 0 <= count <= self.block_size:
            raise ValueError(f"a block has {self.block_size} samples, not {count}")
        return count

    def block(self, region: str, index: int, count: int | None = None) -> torch.Tensor:
        """σ·N(0, I) in float64, shape (count or B, *shape): the first `count` samples of the
        block, the same values whatever `count`; on the stream's device."""
        shape = (self._count(count), *self.shape)
        if self.on_device:
            z = device_normal(self.key(region, index), math.prod(shape), self.device)
            return z.reshape(shape).mul_(self.sigma)
        drawn = standard_normal(block_generator(self.key(region, index)), shape)
        drawn *= self.sigma
        return torch.from_numpy(drawn)

    def noisy(
        self, x: torch.Tensor, region: str, index: int, count: int | None = None
    ) -> torch.Tensor:
        """x + δ_i for the first `count` samples of the block: added in float64 and rounded
        once to float32, the model's dtype, on the stream's device."""
        if self.on_device:
            noisy = self.block(region, index, count)
            noisy += x.to(self.device, torch.float64)
            return noisy.to(torch.float32)
        count = self._count(count)
        # a few samples at a time, so that the float64 sums never outweigh the float32 result
        # (a 224×224 photo's block is 128 MiB in float64); the values are those of `block`,
        # since a longer draw continues a shorter one
        out = np.empty((count, *self.shape), dtype=np.float32)
        x64 = x.detach().cpu().numpy().astype(np.float64)
        gen = block_generator(self.key(region, index))
        step = max(1, SUM_ELEMENTS // math.prod(self.shape))
        for start in range(0, count, step):
            part = standard_normal(gen, (min(step, count - start), *self.shape))
            part *= self.sigma
            part += x64
            out[start : start + len(part)] = part
        return torch.from_numpy(out).to(self.device)
