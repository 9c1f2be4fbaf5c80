"""The CUDA paths, end to end: skipped where there is no CUDA device (CI has none); run on a GPU
machine with `pytest tests/test_cuda.py tests/test_noise.py`."""

import json
import math

import pytest
import torch
from scipy.stats import norm

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split
from blackbox_smooth.noise import (
    DEVICE_NOISE_VERSION,
    ESTIMATION,
    NOISE_VERSION,
    NoiseStream,
    block_key,
    device_normal,
)
from blackbox_smooth.smooth import Smoothed

from .conftest import run_cli
from .test_lora import MODEL_SOURCE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_device_generator_gives_the_same_stream_on_cuda_as_on_the_cpu():
    """Philox's integer words are bit-identical on both devices; float64 log, cos and sin may
    differ in the last bits, which almost never survives the rounding to float32."""
    key = block_key(5, "dev", ESTIMATION, 3)
    on_cuda = device_normal(key, 3_000_000, CUDA).cpu()
    on_cpu = device_normal(key, 3_000_000, torch.device("cpu"))
    assert torch.allclose(on_cuda, on_cpu, rtol=1e-13, atol=1e-13)
    x = torch.rand(3, 32, 32)
    streams = [NoiseStream(x.shape, 0.5, 2, "dev", d, on_device=True) for d in (CUDA, CPU)]
    assert streams[0].version == DEVICE_NOISE_VERSION and streams[0].on_device
    a, b = (s.noisy(x.to(s.device), ESTIMATION, 1).cpu() for s in streams)
    assert (a != b).float().mean().item() < 1e-5


def test_tails_on_cuda_are_gaussian_over_a_billion_coordinates():
    stream = NoiseStream((1, 128, 128), 1.0, seed=11, digest="tails", device=CUDA)
    blocks = math.ceil(1e9 / (stream.block_size * 128 * 128))
    counts, total = {5.0: 0, 5.8: 0}, 0
    for b in range(blocks):
        z = stream.block(ESTIMATION, b).abs_()
        total += z.numel()
        for t in counts:
            counts[t] += int((z > t).sum())
    assert total >= 10**9
    for t, count in counts.items():
        expected = 2 * norm.sf(t) * total
        assert abs(count - expected) <= 4 * math.sqrt(expected), (t, count, expected)
    assert counts[5.8] > 0


def test_certify_on_cuda_is_reproducible_and_agrees_with_the_cpu(digits_model):
    """On CUDA the noise is drawn on the GPU: the counts do not depend on the batch, and they
    are another sample of the same smoothed classifier as the CPU's (within 5 standard errors);
    the cache keys say which generator drew them."""
    x = digits_split()[2][0]
    runs = {}
    for name, batch in (("cuda", 1024), ("cuda-small", 100), ("cpu", 1024)):
        device = torch.device(name.split("-")[0])
        model = TorchModel.from_torchscript(str(digits_model), device, max_batch=batch)
        s = Smoothed(model, 0.5, seed=3, device=device)
        runs[name] = (s.certify_sync(x, n0=100, n=20_000, alpha=0.001), s._prepare(x)[2])
        s.close()
    (cuda, key), (small, _), (cpu, cpu_key) = runs["cuda"], runs["cuda-small"], runs["cpu"]
    assert cuda.counts == small.counts and cuda.counts_selection == small.counts_selection
    assert key["noise"] == DEVICE_NOISE_VERSION and cpu_key["noise"] == NOISE_VERSION
    assert cuda.label == cpu.label
    p, q = cuda.counts.get(cuda.label, 0) / 20_000, cpu.counts.get(cpu.label, 0) / 20_000
    assert abs(p - q) <= 5 * math.sqrt(2 * max(p * (1 - p), 1e-4) / 20_000)


def test_cli_trains_a_whitebox_front_end_and_certifies_on_cuda(digits_model, digits_60, tmp_path):
    r = run_cli("train", "--method", "whitebox", "-e", f"torch:{digits_model}", "--data",
                digits_60, "--sigma", "0.5", "--out", tmp_path / "fe", "--epochs", "1",
                "--pretrain-epochs", "1", "--device", "cuda", "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    image = tmp_path / "d.png"
    save_image(digits_split()[2][1], image)
    c = run_cli("certify", image, "-e", f"torch:{digits_model}", "--frontend", tmp_path / "fe",
                "--sigma", "0.5", "--n", "2000", "--json", "--no-cache", "--device", "auto")  # fmt: skip
    assert c.returncode == 0, c.stderr
    out = json.loads(c.stdout)
    assert sum(out["counts"].values()) == 2000 and out["label"] is not None


def test_cli_trains_lora_on_cuda_and_the_adapter_loads_on_the_cpu(digits_model, tmp_path):
    module = tmp_path / "model.py"
    module.write_text(MODEL_SOURCE.format(path=str(digits_model)))
    data = tmp_path / "data"
    x, y = digits_split()[0][:80], digits_split()[1][:80]
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (data / str(label)).mkdir(parents=True, exist_ok=True)
        save_image(img, data / str(label) / f"{i}.png")
    r = run_cli("train", "--method", "lora", "-e", f"torch:{module}:build", "--data", data,
                "--sigma", "0.5", "--out", tmp_path / "run", "--epochs", "1", "--lora-rank", "2",
                "--device", "cuda")  # fmt: skip
    assert r.returncode == 0, r.stderr
    image = tmp_path / "d.png"
    save_image(digits_split()[2][2], image)
    tops = []
    for device in ("cuda", "cpu"):
        c = run_cli("certify", image, "-e", f"torch:{module}:build", "--adapter", tmp_path / "run",
                    "--sigma", "0.5", "--n", "2000", "--json", "--no-cache", "--device", device)  # fmt: skip
        assert c.returncode == 0, c.stderr
        out = json.loads(c.stdout)
        assert sum(out["counts"].values()) == 2000
        tops.append(max(out["counts"].values()) / 2000)
    assert abs(tops[0] - tops[1]) <= 5 * math.sqrt(2 * max(tops[0] * (1 - tops[0]), 1e-3) / 2000)
