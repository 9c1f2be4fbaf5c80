"""How much each way of learning a front end buys, measured in one run.

Digits upsampled to 28×28 (first 1,297 train, last 500 test), the demo CNN as the black box
behind the Open Inference Protocol on loopback, σ = 0.5. Rows: no front end; the MSE-only
denoiser (0 queries); `distill` (≤ 20,000 queries); `spsa` (≤ 100,000 queries, from the MSE
denoiser); `whitebox` (backprop through the local model: the upper bound). Columns: queries,
training wall time, noisy accuracy on the 500 test images (one noise draw each, asked of the
black box), and certified accuracy (n0 = 100, n = 1,000, α = 0.001, first 100 test images, over
HTTP) at radii 0, 0.25, 0.5, 0.75, 1.0.

Run: `make bench-train` (or .venv/bin/python benchmarks/train_frontends.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.data import load_digits
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digits import TRAIN, train_digits_model
from blackbox_smooth.serve import ServerProcess
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.training import TrainSettings, train
from blackbox_smooth.votes import Votes

SIGMA, N0, N, ALPHA = 0.5, 100, 1_000, 0.001
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


async def noisy_accuracy(url: str, frontend, x: np.ndarray, y: np.ndarray) -> float:
    box = open_blackbox(url, EndpointOptions(batch=250, concurrency=4))
    gen = torch.Generator().manual_seed(12345)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        inputs = xt + SIGMA * torch.randn(xt.shape, generator=gen)
        if frontend is not None:
            inputs = frontend(inputs)
    answer = await Votes(box, None, 4).ask(inputs)
    await box.aclose()
    return float((answer.labels == y).mean())


async def certified(url: str, frontend, x: np.ndarray, y: np.ndarray) -> list[float]:
    box = open_blackbox(url, EndpointOptions(batch=250, concurrency=8))
    smoothed = Smoothed(box, SIGMA, frontend=frontend, concurrency=8, device="cpu")
    certs = await asyncio.gather(*(smoothed.certify(xi, n0=N0, n=N, alpha=ALPHA) for xi in x))
    await smoothed.aclose()
    radii = np.array([c.radius if c.label == yi else -1.0 for c, yi in zip(certs, y, strict=True)])
    return [float((radii >= r).mean()) if r > 0 else float((radii > 0).mean()) for r in RADII]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certify-images", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="rows to run (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model_path = train_digits_model(DEMO_DIR)
    x, y = load_digits()
    x_tr, x_te, y_te = x[:TRAIN], x[TRAIN:], y[TRAIN:]
    x_cert, y_cert = x_te[: args.certify_images], y_te[: args.certify_images]
    rows = []
    with (
        ServerProcess(f"torch:{model_path}", "digits") as server,
        tempfile.TemporaryDirectory() as tmp,
    ):
        http_box = open_blackbox(server.url, EndpointOptions(batch=250, concurrency=8))
        local_box = open_blackbox(f"torch:{model_path}", EndpointOptions(batch=1024))
        plans = [
            ("none", None, None),
            ("mse denoiser", http_box, TrainSettings(SIGMA, objective="mse")),
            ("distill", http_box, TrainSettings(SIGMA, method="distill", max_queries=20_000)),
            (
                "spsa",
                http_box,
                TrainSettings(SIGMA, method="spsa", max_queries=100_000, lora_rank=4, epochs=5),
            ),
            ("whitebox", local_box, TrainSettings(SIGMA, method="whitebox", max_queries=20_000)),
        ]
        for name, box, settings in plans:
            if args.only and name not in args.only:
                continue
            frontend, queries, seconds = None, 0, 0.0
            if settings is not None:
                start = time.perf_counter()
                result = asyncio.run(
                    train(box, x_tr, None, settings, Path(tmp) / name.replace(" ", "_"),
                          log=lambda m: None, progress=False)
                )  # fmt: skip
                frontend, queries = result.frontend, result.config.queries
                seconds = time.perf_counter() - start
            acc = asyncio.run(noisy_accuracy(server.url, frontend, x_te, y_te))
            cert = asyncio.run(certified(server.url, frontend, x_cert, y_cert))
            rows.append(
                {"row": name, "queries": queries, "seconds": seconds, "noisy": acc, "cert": cert}
            )
            print(f"  {name}: noisy accuracy {acc:.3f}, certified {cert}", flush=True)

    head = f"{'front end':<14} {'queries':>8} {'train s':>8} {'noisy acc':>9} " + " ".join(
        f"{'r=' + str(r):>7}" for r in RADII
    )
    print(head)
    for r in rows:
        cells = " ".join(f"{c:>7.2f}" for c in r["cert"])
        print(f"{r['row']:<14} {r['queries']:>8} {r['seconds']:>8.0f} {r['noisy']:>9.3f} {cells}")
    by = {r["row"]: r for r in rows}
    result = {}
    if {"distill", "whitebox", "none"} <= by.keys():
        d, w, none = by["distill"], by["whitebox"], by["none"]
        result.update(
            distill_queries=d["queries"],
            distill_gap_r050=100 * (w["cert"][2] - d["cert"][2]),
            distill_gap_r100=100 * (w["cert"][4] - d["cert"][4]),
            distill_gain_r100=100 * (d["cert"][4] - none["cert"][4]),
        )
    if {"spsa", "mse denoiser"} <= by.keys():
        result["spsa_gain"] = 100 * (by["spsa"]["noisy"] - by["mse denoiser"]["noisy"])
    print(
        "RESULT "
        + " ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
    )
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/train_frontends.json").write_text(
        json.dumps({"rows": rows, **result}, indent=2)
    )


if __name__ == "__main__":
    main()
