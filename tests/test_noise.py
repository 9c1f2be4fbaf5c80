"""The noise behind every certificate: Gaussian tails, distinct blocks, reproducible streams and
x + δ rounded once. Clopper–Pearson holds only if the samples are independent Gaussian draws."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from blackbox_smooth import noise
from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.digests import image_digest
from blackbox_smooth.noise import (
    DEVICE_NOISE_VERSION,
    ESTIMATION,
    NOISE_VERSION,
    SELECTION,
    NoiseStream,
    block_generator,
    block_key,
    device_normal,
    philox4x32,
    standard_normal,
)
from blackbox_smooth.smooth import Smoothed

CPU = torch.device("cpu")
# torch's float32 CPU randn is Box–Muller on uniforms of 24 bits: |z| ≤ √(−2·ln 2⁻²⁴).
FLOAT32_BOX_MULLER_MAX = math.sqrt(2 * 24 * math.log(2))  # 5.7686


def tail_counts(draws, thresholds):
    """How many of the drawn coordinates lie beyond each threshold (two-sided), and how many
    coordinates were drawn; `draws` yields arrays, one chunk of < 1 GiB at a time."""
    counts, total = dict.fromkeys(thresholds, 0), 0
    for z in draws:
        a = np.abs(z, out=z)
        total += a.size
        for t in thresholds:
            counts[t] += int(np.count_nonzero(a > t))
    return counts, total


@pytest.mark.slow
def test_tails_beyond_5_8_sigma_are_gaussian_over_a_billion_coordinates():
    """10⁹ coordinates drawn as certification draws them (NoiseStream blocks of 2²⁴ values,
    128 MiB each): as many beyond 5σ and 5.8σ as N(0, 1) puts there, within a Poisson band of 4
    standard deviations. A generator without a tail (float32 Box–Muller stops at 5.768σ) fails
    the `> 0` check: a Gaussian leaves none beyond 5.8σ with probability e^−6.7 ≈ 0.001."""
    stream = NoiseStream((1, 128, 128), 1.0, seed=11, digest="tails", device=CPU)
    blocks = math.ceil(1e9 / (stream.block_size * 128 * 128))  # 60 blocks of 1,024 samples
    draws = (stream.block(ESTIMATION, b).numpy() for b in range(blocks))
    counts, total = tail_counts(draws, (5.0, 5.8))
    assert total >= 10**9
    for t, count in counts.items():
        expected = 2 * norm.sf(t) * total  # 577 beyond 5σ, 6.7 beyond 5.8σ
        assert abs(count - expected) <= 4 * math.sqrt(expected), (t, count, expected)
    assert counts[5.8] > 0


def test_float32_torch_randn_has_no_tail_beyond_5_77_sigma():
    """Why the noise is float64: 10⁸ float32 torch draws (the old noise) never pass 5.768σ, so
    none lies beyond 5.8σ, where N(0, 1) puts 2·Φ(−5.8) = 6.6e-9 of its mass; across the 150,528
    coordinates of a 224×224 RGB image that is a total-variation gap of ~1e-3 per sample."""
    gen = torch.Generator().manual_seed(0)
    draws = (torch.randn(2**24, generator=gen).numpy() for _ in range(6))
    counts, total = tail_counts(draws, (5.0, 5.8, FLOAT32_BOX_MULLER_MAX + 1e-4))
    assert total >= 10**8
    assert counts[5.0] > 0  # it does reach into the tail …
    assert counts[5.8] == 0 and counts[FLOAT32_BOX_MULLER_MAX + 1e-4] == 0  # … but stops short


def test_keys_that_agree_in_their_low_bits_give_different_streams():
    """Every bit of a block's 256-bit key reaches its generator: keys that agree in their low 32
    bits, their low 64 bits, or differ only in the top half still give different noise. The old
    seeds went through `torch.Generator.manual_seed`, which keeps 32 bits on the CPU."""
    key = block_key(0, "abc", ESTIMATION, 5)
    reference = standard_normal(block_generator(key), (1000,))
    for bit in (0, 31, 32, 63, 64, 127, 128, 191, 200, 255):
        other = standard_normal(block_generator(key ^ (1 << bit)), (1000,))
        assert not np.any(other == reference), bit
    old = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (7, 7 + 2**32)]
    assert torch.equal(*old)  # what went wrong before


def test_no_two_blocks_of_a_large_certificate_share_a_stream():
    """A 3×224×224 image at n = 10⁶ (9,010 estimation blocks of 111 samples, plus selection):
    drawing every block (1.4·10¹¹ floats) is too slow, so instead: the full 256-bit keys, their
    128-bit Philox keys and their starting counters are all distinct, and the first coordinates
    of every block, drawn with that block's own generator, are distinct too. That keys differing
    in any bit give different streams is the test above."""
    digest = image_digest(np.zeros((3, 224, 224)))
    stream = NoiseStream((3, 224, 224), 0.5, seed=0, digest=digest, device=CPU)
    blocks = [(SELECTION, b) for b, _ in stream.blocks(100)]
    blocks += [(ESTIMATION, b) for b, _ in stream.blocks(10**6)]
    assert len(blocks) == 9011
    keys = [stream.key(region, b) for region, b in blocks]
    assert len(set(keys)) == len(blocks)
    assert len({k & (2**128 - 1) for k in keys}) == len(blocks)  # Philox keys
    assert len({k >> 128 for k in keys}) == len(blocks)  # starting counters
    firsts = {standard_normal(block_generator(k), (4,)).tobytes() for k in keys}
    assert len(firsts) == len(blocks)


@pytest.mark.parametrize("on_device", [False, True], ids=["numpy", "device-generator"])
def test_a_block_is_the_same_noise_every_time_and_for_every_count(on_device):
    stream = NoiseStream((1, 8, 8), 0.5, seed=3, digest="abc", device=CPU, on_device=on_device)
    whole = stream.block(ESTIMATION, 2)
    assert whole.dtype == torch.float64 and whole.shape == (stream.block_size, 1, 8, 8)
    assert torch.equal(whole, stream.block(ESTIMATION, 2))  # bit-identical twice
    for count in (1, 10, 777):
        assert torch.equal(stream.block(ESTIMATION, 2, count), whole[:count])  # a prefix
    assert not torch.equal(whole, stream.block(SELECTION, 2))  # regions differ
    assert not torch.equal(whole, stream.block(ESTIMATION, 3))
    for other in (
        NoiseStream((1, 8, 8), 0.5, seed=4, digest="abc", device=CPU, on_device=on_device),
        NoiseStream((1, 8, 8), 0.5, seed=3, digest="abd", device=CPU, on_device=on_device),
    ):
        assert not torch.equal(whole, other.block(ESTIMATION, 2))
    assert whole.std().item() == pytest.approx(0.5, rel=0.02)
    with pytest.raises(ValueError):
        stream.block(ESTIMATION, 0, stream.block_size + 1)


@pytest.mark.parametrize("on_device", [False, True], ids=["numpy", "device-generator"])
def test_x_plus_delta_is_added_in_float64_and_rounded_once(on_device):
    stream = NoiseStream((1, 16, 16), 0.7, seed=1, digest="round", device=CPU, on_device=on_device)
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 16, 16)).astype(np.float32))
    delta = stream.block(ESTIMATION, 0).numpy()
    once = (x.numpy().astype(np.float64) + delta).astype(np.float32)
    twice = x.numpy() + delta.astype(np.float32)  # the old way: float32 noise, float32 sum
    assert np.count_nonzero(once != twice) > 100  # the two roundings do differ here …
    noisy = stream.noisy(x, ESTIMATION, 0)
    assert noisy.dtype == torch.float32 and noisy.device == CPU
    assert np.array_equal(noisy.numpy(), once)  # … and the noisy image is rounded once
    assert np.array_equal(stream.noisy(x, ESTIMATION, 0, 5).numpy(), once[:5])


def test_large_blocks_are_summed_a_few_samples_at_a_time_with_the_same_values(monkeypatch):
    stream = NoiseStream((3, 16, 16), 0.5, seed=2, digest="chunks", device=CPU, on_device=False)
    x = torch.from_numpy(np.random.default_rng(1).uniform(0, 1, (3, 16, 16)).astype(np.float32))
    whole = stream.noisy(x, ESTIMATION, 1, 100)
    monkeypatch.setattr(noise, "SUM_ELEMENTS", 3 * 16 * 16 * 7)  # 7 samples at a time
    assert torch.equal(stream.noisy(x, ESTIMATION, 1, 100), whole)
    expected = x.numpy().astype(np.float64) + stream.block(ESTIMATION, 1, 100).numpy()
    assert np.array_equal(whole.numpy(), expected.astype(np.float32))


# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter[4] key[2] → result[4].
PHILOX_KAT = [
    (
        "00000000 00000000 00000000 00000000 00000000 00000000",
        "6627e8d5 e169c58d bc57ac4c 9b00dbd8",
    ),
    (
        "ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff",
        "408f276d 41c83b0e a20bc7c6 6d5451fd",
    ),
    (
        "243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0",
        "d16cfe09 94fdcceb 5001e420 24126ea1",
    ),
]


@pytest.mark.parametrize(("given", "expected"), PHILOX_KAT)
def test_the_device_generator_is_philox4x32_10(given, expected):
    words = [int(w, 16) for w in given.split()]
    out = philox4x32(tuple(torch.tensor([w]) for w in words[:4]), (words[4], words[5]))
    assert [f"{int(w):08x}" for w in out] == expected.split()


def test_the_device_generator_draws_gaussians_with_independent_halves():
    """4·10⁶ Box–Muller values from one key: Kolmogorov–Smirnov against N(0, 1), the tail beyond
    4σ within a Poisson band, the two values of each pair uncorrelated, the largest value inside
    Box–Muller's bound for a uniform ≥ 2⁻⁵⁴ (√(2·54·ln 2) ≈ 8.65)."""
    from scipy.stats import kstest

    z = device_normal(block_key(0, "dist", ESTIMATION, 0), 4_000_000, CPU).numpy()
    assert kstest(z[:1_000_000], "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / math.sqrt(z.size) and abs(z.var() - 1) < 5 * math.sqrt(2 / z.size)
    beyond, expected = np.count_nonzero(np.abs(z) > 4), 2 * norm.sf(4) * z.size  # ≈ 253
    assert abs(beyond - expected) <= 4 * math.sqrt(expected)
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / math.sqrt(z.size / 2)
    assert np.abs(z).max() <= math.sqrt(2 * 54 * math.log(2))


def test_the_device_generator_uses_160_bits_of_the_block_key():
    """Philox4×32 takes a 64-bit key; the next 96 bits of the block key are the high words of
    the counter. Keys differing in any of those 160 bits give different streams."""
    key = block_key(0, "abc", ESTIMATION, 5)
    reference = device_normal(key, 1000, CPU)
    for bit in (0, 31, 32, 63, 64, 95, 96, 127, 128, 159):
        assert not torch.any(device_normal(key ^ (1 << bit), 1000, CPU) == reference), bit
    digest = image_digest(np.zeros((3, 224, 224)))
    stream = NoiseStream((3, 224, 224), 0.5, seed=0, digest=digest, device=CPU, on_device=True)
    keys = [stream.key(ESTIMATION, b) for b, _ in stream.blocks(10**6)]
    keys += [stream.key(SELECTION, b) for b, _ in stream.blocks(100)]
    assert len({k & (2**160 - 1) for k in keys}) == len(keys) == 9011
    assert stream.version == DEVICE_NOISE_VERSION != NOISE_VERSION


FIVE_CLASS = """
import numpy as np
M = np.random.default_rng(7).normal(size=(5, 784))
def f(x):
    return (x.reshape(len(x), -1) @ M.T).argmax(axis=1)
"""


def test_counts_do_not_depend_on_batch_or_concurrency(tmp_path):
    """A 28×28 image has blocks of 1,024 samples: n = 2,500 ends inside a block, and batches of
    7 or 1,000 cut blocks at different places; the counts stay the same."""
    path = tmp_path / "five.py"
    path.write_text(FIVE_CLASS)
    x = np.linspace(0, 1, 784, dtype=np.float32).reshape(1, 28, 28)

    def counts(batch, concurrency):
        bb = open_blackbox(f"python:{path}:f", EndpointOptions(batch=batch))
        s = Smoothed(bb, sigma=0.5, seed=0, concurrency=concurrency, device="cpu")
        assert s._prepare(x)[2]["noise"] == NOISE_VERSION == "philox-f64-v2"
        cert = s.certify_sync(x, n0=100, n=2500, alpha=0.001)
        s.close()
        return cert.counts_selection, cert.counts

    small = counts(7, 1)
    assert sum(small[1].values()) == 2500 and len(small[1]) > 1  # a split vote
    assert counts(1000, 8) == small
