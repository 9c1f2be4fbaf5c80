"""How fast bbsmooth certifies, against the limits of the same machine, measured in one run.

1. Local torch model, n = 10,000: bbsmooth's samples/s against the raw batched forward pass
   (noise + forward + argmax + bincount in a tight loop: the limit) and against a plain
   sequential port of Cohen et al.'s `_sample_noise` loop, both drawing their noise as bbsmooth
   does (float64 Philox blocks, x + δ rounded once to float32). Target: ratio_vs_raw ≥ 0.9.
   The raw loop with float32 torch `randn` noise (the baseline) is timed too: noise_speed_vs_float32
   is what the exact-tailed float64 noise costs.
2. HTTP: a loopback Open Inference Protocol server (`bbsmooth serve`, its own process) that
   answers each request after a fixed service delay and serves up to 64 at once. Capacity is
   64 ÷ delay requests/s; bbsmooth runs at --concurrency 64. Target: ratio_vs_capacity ≥ 0.8.
3. Replaying a finished HTTP certification from the disk cache. Target: replay_speedup ≥ 50.

The local rows run in turn, round after round (--repeats, default 5): each ratio is the
median of its per-round ratios, printed with its range, so that a busy moment on the machine
cannot flip it (timed once each, one after the other, ratio_vs_raw read 1.03, 1.67, 0.35 and
2.63 in four runs).

Run: `make bench-throughput` (or .venv/bin/python -m benchmarks.certify_throughput).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.timing import alternate, speed_ratio, spread
from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.cache import BlockCache
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digests import image_digest
from blackbox_smooth.digits import digits_split, train_digits_model
from blackbox_smooth.noise import ESTIMATION, SELECTION, NoiseStream
from blackbox_smooth.serve import ServerProcess
from blackbox_smooth.smooth import Smoothed

SIGMA, N0, N, ALPHA = 0.25, 100, 10_000, 0.001


# -- 1. local ----------------------------------------------------------------------------------


def raw_forward(model: torch.jit.ScriptModule, x: torch.Tensor, total: int) -> None:
    """The limit: noise (drawn as bbsmooth draws it), forward, argmax and bincount, nothing
    else."""
    stream = NoiseStream(tuple(x.shape), SIGMA, 0, image_digest(x), x.device)
    counts = torch.zeros(10, dtype=torch.long, device=x.device)
    with torch.inference_mode():
        for b, k in stream.blocks(total):
            counts += torch.bincount(
                model(stream.noisy(x, ESTIMATION, b, k)).argmax(1), minlength=10
            )


def raw_forward_float32(
    model: torch.jit.ScriptModule, x: torch.Tensor, total: int, batch: int
) -> None:
    """The same loop with the baseline noise: float32 torch `randn`, added in float32."""
    gen = torch.Generator(x.device).manual_seed(0)
    counts = torch.zeros(10, dtype=torch.long, device=x.device)
    with torch.inference_mode():
        for start in range(0, total, batch):
            k = min(batch, total - start)
            noise = torch.randn((k, *x.shape), generator=gen, device=x.device) * SIGMA
            counts += torch.bincount(model(x + noise).argmax(1), minlength=10)


def cohen_reference(model: torch.jit.ScriptModule, x: torch.Tensor) -> None:
    """A plain port of Cohen et al.'s CERTIFY: `_sample_noise` twice, sequential batches (one
    noise block each, drawn as bbsmooth draws it)."""
    stream = NoiseStream(tuple(x.shape), SIGMA, 0, image_digest(x), x.device)

    def sample_noise(region: str, num: int) -> np.ndarray:
        counts = np.zeros(10, dtype=int)
        with torch.no_grad():
            for b, this_batch in stream.blocks(num):
                predictions = model(stream.noisy(x, region, b, this_batch)).argmax(1)
                counts += np.bincount(predictions.cpu().numpy(), minlength=10)
        return counts

    sample_noise(SELECTION, N0)
    sample_noise(ESTIMATION, N)


def local_benchmark(
    model_path: Path, x: np.ndarray, repeats: int, device: torch.device
) -> dict[str, Any]:
    model = torch.jit.load(str(model_path), map_location=device).eval()
    xt = torch.from_numpy(x).to(device)
    total = N0 + N
    bb = open_blackbox(f"torch:{model_path}", EndpointOptions(batch=1024), device)
    cache_dir = tempfile.mkdtemp(prefix="bbsmooth-bench-")

    def ours() -> None:  # a fresh cache each time: every sample is computed and stored
        s = Smoothed(bb, SIGMA, cache=BlockCache(tempfile.mkdtemp(dir=cache_dir)), device=device)
        s.certify_sync(x, n0=N0, n=N, alpha=ALPHA)
        s._runner.close()

    raw_forward(model, xt, 2048)  # warm up
    raw_forward_float32(model, xt, 2048, 1024)
    ours()
    seconds = alternate(
        {
            "raw": lambda: raw_forward(model, xt, total),
            "raw_float32": lambda: raw_forward_float32(model, xt, total, 1024),
            "reference": lambda: cohen_reference(model, xt),
            "bbsmooth": ours,
        },
        repeats,
    )
    out: dict[str, Any] = {k: total / statistics.median(v) for k, v in seconds.items()}
    out["vs_raw"] = speed_ratio(seconds["bbsmooth"], seconds["raw"])
    out["vs_reference"] = speed_ratio(seconds["bbsmooth"], seconds["reference"])
    out["raw_vs_float32"] = speed_ratio(seconds["raw"], seconds["raw_float32"])
    return out


def noise_benchmark(device: torch.device, repeats: int) -> dict[str, Any]:
    """Noisy 3×224×224 images per second, drawn and added as certification does: numpy on the
    CPU, the device generator (Philox4×32 + Box–Muller, what CUDA runs use) on `device`, and
    float32 `randn` on `device` for scale (the baseline)."""
    shape = (3, 224, 224)
    x = torch.rand(shape, device=device)
    block = NoiseStream(shape, SIGMA, 0, "bench", device).block_size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def drawing(on_device: bool) -> Any:
        stream = NoiseStream(shape, SIGMA, 0, "bench", device, on_device=on_device)

        def draw() -> None:
            stream.noisy(x, ESTIMATION, 0)
            sync()

        return draw

    def float32() -> None:
        _ = x + torch.randn((block, *shape), device=device) * SIGMA
        sync()

    rows = {"numpy_cpu": drawing(False), "device_generator": drawing(True), "float32": float32}
    for run in rows.values():
        run()  # warm up
    seconds = alternate(rows, repeats)
    out: dict[str, Any] = {k: block / statistics.median(v) for k, v in seconds.items()}
    fastest = max(("numpy_cpu", "device_generator"), key=lambda k: out[k])
    out["vs_float32"] = speed_ratio(seconds[fastest], seconds["float32"])
    return out


# -- 2. HTTP -----------------------------------------------------------------------------------


def sequential_client(url: str, x: np.ndarray, requests: int, batch: int) -> float:
    """Requests/s of a plain client that sends one request at a time."""
    rng = np.random.default_rng(0)
    with httpx.Client() as client:
        start = time.perf_counter()
        for _ in range(requests):
            noisy = np.clip(x + rng.normal(0, SIGMA, (batch, *x.shape)), 0, 1).astype(np.float32)
            body = {
                "inputs": [
                    {
                        "name": "input-0",
                        "shape": list(noisy.shape),
                        "datatype": "FP32",
                        "data": noisy.ravel().tolist(),
                    }
                ]
            }
            client.post(url, json=body).raise_for_status()
        return requests / (time.perf_counter() - start)


def http_benchmark(model_path: Path, x: np.ndarray, delay: float, requests: int) -> dict:
    with ServerProcess(f"torch:{model_path}", "digits", delay=delay) as server:
        url = server.url
        options = EndpointOptions(batch=1, concurrency=64)

        def run(n: int, seed: int) -> float:
            bb = open_blackbox(url, options)
            s = Smoothed(bb, SIGMA, concurrency=64, seed=seed, device="cpu")
            start = time.perf_counter()
            s.predict_sync(x, n=n)
            elapsed = time.perf_counter() - start
            s.close()
            return elapsed

        run(256, seed=99)  # warm up: connections, imports
        t = run(requests, seed=1)
        seq = sequential_client(url, x, max(20, int(2.0 / delay)), batch=1)
    return {"delay": delay, "bbsmooth": requests / t, "capacity": 64 / delay, "sequential": seq}


# -- 3. replay ---------------------------------------------------------------------------------


def replay_benchmark(model_path: Path, x: np.ndarray, delay: float) -> dict[str, float]:
    cache = BlockCache(tempfile.mkdtemp(prefix="bbsmooth-replay-"))
    with ServerProcess(f"torch:{model_path}", "digits", delay=delay) as server:
        url = server.url
        options = EndpointOptions(batch=64, concurrency=16)
        times = []
        for _ in range(2):
            s = Smoothed(open_blackbox(url, options), SIGMA, cache=cache, device="cpu")
            start = time.perf_counter()
            cert = s.certify_sync(x, n0=N0, n=N, alpha=ALPHA)
            times.append(time.perf_counter() - start)
            s.close()
        assert cert.queries_sent == 0 and cert.queries_cached == N0 + N
    return {"first": times[0], "replay": times[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the rows")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the local model")
    parser.add_argument("--local-only", action="store_true", help="skip the HTTP and replay parts")
    args = parser.parse_args()

    device = torch.device(args.device)
    model_path = train_digits_model(DEMO_DIR)
    x = digits_split()[2][0]
    local = local_benchmark(model_path, x, args.repeats, device)
    rows = [
        (
            f"local torch ({device.type}), n=10,100",
            "raw batched forward (limit)",
            f"{local['raw']:,.0f} samples/s",
        ),
        ("", "raw loop, float32 torch.randn", f"{local['raw_float32']:,.0f} samples/s"),
        ("", "Cohen et al. reference loop", f"{local['reference']:,.0f} samples/s"),
        ("", "bbsmooth certify (cache on)", f"{local['bbsmooth']:,.0f} samples/s"),
        (
            "",
            f"bbsmooth ÷ raw, median (range) of {args.repeats} alternations",
            spread(local["vs_raw"]),
        ),
        ("", "bbsmooth ÷ reference", spread(local["vs_reference"])),
    ]
    noise = noise_benchmark(device, args.repeats)
    rows += [
        (
            f"noise, 3×224×224 ({device.type})",
            "numpy Philox4×64 on the CPU",
            f"{noise['numpy_cpu']:,.0f} images/s",
        ),
        (
            "",
            f"Philox4×32 + Box–Muller on {device.type}",
            f"{noise['device_generator']:,.0f} images/s",
        ),
        ("", f"float32 torch.randn on {device.type}", f"{noise['float32']:,.0f} images/s"),
    ]
    result = {
        "ratio_vs_raw": local["vs_raw"][0],
        "ratio_vs_reference": local["vs_reference"][0],
        "noise_speed_vs_float32": local["raw_vs_float32"][0],
        "noise_224_vs_float32": noise["vs_float32"][0],
    }
    if not args.local_only:
        http = [http_benchmark(model_path, x, d, args.requests) for d in (0.1, 0.02)]
        replay = replay_benchmark(model_path, x, 0.02)
        for h in http:
            label = f"HTTP, {h['delay'] * 1000:.0f} ms delay, 64 slots"
            rows += [
                (label, "server capacity (64 ÷ delay)", f"{h['capacity']:,.0f} queries/s"),
                ("", "sequential client", f"{h['sequential']:,.0f} queries/s"),
                ("", "bbsmooth --concurrency 64", f"{h['bbsmooth']:,.0f} queries/s"),
            ]
        rows += [
            ("replay, HTTP 20 ms, n=10,100", "first run", f"{replay['first']:.3f} s"),
            ("", "replay from cache", f"{replay['replay']:.3f} s"),
        ]
        result |= {
            "ratio_vs_capacity": http[0]["bbsmooth"] / http[0]["capacity"],
            "ratio_vs_sequential": http[0]["bbsmooth"] / http[0]["sequential"],
            "ratio_vs_capacity_20ms": http[1]["bbsmooth"] / http[1]["capacity"],
            "replay_speedup": replay["first"] / replay["replay"],
        }
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))
    name = "certify_throughput" + ("" if device.type == "cpu" else f"_{device.type}")
    Path("benchmarks/results").mkdir(exist_ok=True)
    Path(f"benchmarks/results/{name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
