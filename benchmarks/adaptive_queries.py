"""Adaptive certification against Cohen et al.'s fixed protocol: queries per image and certified
accuracy at a target radius, measured in one run.

200 held-out digits (the last 500 of the split, first 200), the demo black box (the digits CNN)
behind a front end trained for σ = 0.25 (a full-image prompt, white-box, so it costs one
forward pass on top of the CNN: fixed n = 100,000 on 200 images is 20 million samples on two
cores), α = 0.001, n0 = 100. For target radii 0.25 and 0.5: (a) fixed n = 10,000 and
n = 100,000, certified when the radius is ≥ R; (b) `certify_adaptive` with the target, capped
at n = 100,000. Same noise seed everywhere, so the adaptive run sees a prefix of the fixed run's
samples.

Run: `make bench-adaptive` (or .venv/bin/python benchmarks/adaptive_queries.py [--images N]).
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
from tqdm import tqdm

from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.demo import DEMO_DIR, digits_split, train_digits_model
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.training import TrainSettings, train

SIGMA, ALPHA, N0 = 0.25, 0.001, 100
TARGETS = (0.25, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    model = train_digits_model(DEMO_DIR)
    x_tr, _, x_te, y_te = digits_split()
    x, y = x_te[: args.images], y_te[: args.images]
    box = open_blackbox(f"torch:{model}", EndpointOptions(batch=1024))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        settings = TrainSettings(SIGMA, frontend="prompt", method="whitebox")
        trained = asyncio.run(
            train(box, x_tr, None, settings, Path(tmp) / "fe", progress=False, log=lambda m: None)
        )
        print(f"front end: prompt, white-box, {time.perf_counter() - start:.0f}s", flush=True)
    smoothed = Smoothed(box, SIGMA, frontend=trained.frontend, device="cpu")

    runs = {
        "fixed n=10,000": lambda xi: smoothed.certify(xi, n0=N0, n=10_000, alpha=ALPHA),
        "fixed n=100,000": lambda xi: smoothed.certify(xi, n0=N0, n=100_000, alpha=ALPHA),
    }
    for r in TARGETS:
        runs[f"adaptive R={r}"] = lambda xi, r=r: smoothed.certify_adaptive(
            xi, n0=N0, n_max=100_000, alpha=ALPHA, target_radius=r
        )
    results: dict[str, list] = {}
    for name, run in runs.items():
        start = time.perf_counter()
        certs = [smoothed._run(run(xi)) for xi in tqdm(x, desc=name, leave=False)]
        results[name] = certs
        print(f"  {name}: {time.perf_counter() - start:.0f}s", flush=True)

    def at(name: str, r: float) -> tuple[float, float]:
        certs = results[name]
        ok = [c.label == yi and c.radius >= r for c, yi in zip(certs, y, strict=True)]
        return float(np.mean(ok)), float(np.mean([c.n0 + c.n for c in certs]))

    print(f"{'protocol':<18} {'target R':>8} {'queries/image':>14} {'certified acc':>14}")
    table = []
    for r in TARGETS:
        for name in ("fixed n=10,000", "fixed n=100,000", f"adaptive R={r}"):
            acc, q = at(name, r)
            table.append({"protocol": name, "target": r, "queries": q, "accuracy": acc})
            print(f"{name:<18} {r:>8.2f} {q:>14,.0f} {acc:>14.3f}")
    result = {}
    for r, key in zip(TARGETS, ("r025", "r050"), strict=True):
        acc_fixed, q_fixed = at("fixed n=100,000", r)
        acc_ad, q_ad = at(f"adaptive R={r}", r)
        result[f"query_saving_{key}"] = q_fixed / q_ad
        result[f"acc_gap_{key}"] = 100 * (acc_fixed - acc_ad)
    print("RESULT " + " ".join(f"{k}={v:.1f}" for k, v in result.items()))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/adaptive_queries.json").write_text(
        json.dumps({"images": len(x), "rows": table, **result}, indent=2)
    )


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
