"""Adaptive certification against Cohen et al.'s fixed protocol: queries per image and certified
accuracy at a target radius, measured in one run.

200 held-out digits (the last 500 of the split, first 200), the demo black box (the digits CNN)
behind a front end trained for σ = 0.25 (a full-image prompt, white-box, so it costs one
forward pass on top of the CNN: fixed n = 100,000 on 200 images is 20 million samples on two
cores), α = 0.001, n0 = 100. For target radii 0.25 and 0.5: (a) fixed n = 10,000 and
n = 100,000, certified when the radius is ≥ R; (b) `certify_adaptive` with the target, capped
at n = 100,000. Same noise seed everywhere, so the adaptive run sees a prefix of the fixed run's
samples. Each adaptive row three times: `union`, the reference (Clopper–Pearson at α/K, K = 11
looks a factor 2 apart, stopping only once decided: the procedure before the confidence
sequence); `union+futility`, the same with curtailment (abstain once even an optimistic future
cannot certify by n_max, stats.futile); `cs`, what `--bound cs` runs: the beta-binomial
confidence sequence at α, looked at every ~10%, with curtailment. cs_saving = union ÷ cs; it
splits into futility_saving (union ÷ union+futility) and bound_saving (union+futility ÷ cs).
`--quick` skips the fixed rows (n = 100,000 is most of the 46 minutes, n = 10,000 another 8):
their queries are n0 + n per image by construction, so the savings are still computed, but not
their accuracy.

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
from scipy.stats import binomtest
from tqdm import tqdm

from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digits import digits_split, train_digits_model
from blackbox_smooth.progress import no_progress
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.training import TrainSettings, train

SIGMA, ALPHA, N0, N_MAX = 0.25, 0.001, 100, 100_000
TARGETS = (0.25, 0.5)
# row name → (bound, futility)
BOUNDS = {"union": ("union", False), "union+futility": ("union", True), "cs": ("cs", True)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="skip the fixed-n rows")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (noise drawn there)")
    parser.add_argument("--seed", type=int, default=0, help="certification noise seed")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = train_digits_model(DEMO_DIR)
    x_tr, _, x_te, y_te = digits_split()
    x, y = x_te[: args.images], y_te[: args.images]
    box = open_blackbox(f"torch:{model}", EndpointOptions(batch=1024), device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        settings = TrainSettings(SIGMA, frontend="prompt", method="whitebox")
        trained = asyncio.run(
            train(
                box,
                x_tr,
                None,
                settings,
                Path(tmp) / "fe",
                device=device,
                progress=no_progress,
                log=lambda m: None,
            )  # fmt: skip
        )
        print(f"front end: prompt, white-box, {time.perf_counter() - start:.0f}s", flush=True)
    # the protocols are compared on the same images on purpose: no ledger (ledger.py)
    smoothed = Smoothed(
        box, SIGMA, frontend=trained.frontend, device=device, seed=args.seed, ledger=None
    )

    runs = {}
    if not args.quick:
        runs["fixed n=10,000"] = lambda xi: smoothed.certify(xi, n0=N0, n=10_000, alpha=ALPHA)
        runs["fixed n=100,000"] = lambda xi: smoothed.certify(xi, n0=N0, n=100_000, alpha=ALPHA)
    for r in TARGETS:
        for row, (bound, futility) in BOUNDS.items():
            runs[f"{row} R={r}"] = lambda xi, r=r, b=bound, f=futility: smoothed.certify_adaptive(
                xi, n0=N0, n_max=N_MAX, alpha=ALPHA, target_radius=r, bound=b, futility=f
            )
    results: dict[str, list] = {}
    for name, run in runs.items():
        start = time.perf_counter()
        certs = [smoothed._run(run(xi)) for xi in tqdm(x, desc=name, leave=False)]
        results[name] = certs
        print(f"  {name}: {time.perf_counter() - start:.0f}s", flush=True)

    def certified(name: str, r: float) -> np.ndarray:
        return np.array(
            [c.label == yi and c.radius >= r for c, yi in zip(results[name], y, strict=True)]
        )

    def at(name: str, r: float) -> tuple[float, float]:
        if name not in results:  # --quick: a fixed row's queries are known, not its accuracy
            return float("nan"), float(N0 + int(name.split("=")[1].replace(",", "")))
        return float(certified(name, r).mean()), float(np.mean([c.n0 + c.n for c in results[name]]))

    print(f"{'protocol':<24} {'target R':>8} {'queries/image':>14} {'certified acc (95% CI)':>24}")
    table = []
    for r in TARGETS:
        for name in ("fixed n=10,000", "fixed n=100,000", *(f"{b} R={r}" for b in BOUNDS)):
            acc, q = at(name, r)
            lo, hi = accuracy_interval(certified(name, r)) if name in results else (acc, acc)
            table.append({"protocol": name, "target": r, "queries": q, "accuracy": acc})
            print(f"{name:<24} {r:>8.2f} {q:>14,.0f} {acc:>10.3f} [{lo:.3f}, {hi:.3f}]")
    # per image and adaptive row: [selection votes, estimation votes, certified at the row's R]
    per_image = {
        name: [[c.n0, c.n, bool(c.label == yi and c.radius >= float(name.split("=")[1]))]
               for c, yi in zip(certs, y, strict=True)]
        for name, certs in results.items() if "R=" in name
    }  # fmt: skip
    result = {}
    for r, key in zip(TARGETS, ("r025", "r050"), strict=True):
        acc_fixed, q_fixed = at("fixed n=100,000", r)
        acc_un, q_un = at(f"union R={r}", r)
        acc_cs, q_cs = at(f"cs R={r}", r)
        _, q_fut = at(f"union+futility R={r}", r)
        result[f"futility_saving_{key}"] = q_un / q_fut
        # the mean is easily set by one image whose pA sits at Φ(R/σ): it needs the cap under
        # every bound. The saving over the other images, for the record (not the goal's figure).
        un = np.array([row[:2] for row in per_image[f"union R={r}"]])
        cs = np.array([row[:2] for row in per_image[f"cs R={r}"]])
        rest = ~((un[:, 1] == N_MAX) & (cs[:, 1] == N_MAX))
        result[f"capped_in_both_{key}"] = float((~rest).sum())
        result[f"cs_saving_uncapped_{key}"] = float(un[rest].sum() / cs[rest].sum())
        result[f"bound_saving_{key}"] = q_fut / q_cs
        result[f"query_saving_{key}"] = q_fixed / q_un
        if not args.quick:
            result[f"acc_gap_{key}"] = 100 * (acc_fixed - acc_un)
        result[f"cs_saving_{key}"] = q_un / q_cs
        result[f"cs_acc_gap_{key}"] = 100 * (acc_un - acc_cs)
        # paired: the same images and noise, so the gap is set by the discordant images
        only_un = int((certified(f"union R={r}", r) & ~certified(f"cs R={r}", r)).sum())
        only_cs = int((~certified(f"union R={r}", r) & certified(f"cs R={r}", r)).sum())
        print(f"R={r}: certified by union only {only_un}, by cs only {only_cs} (of {len(y)})")
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    name = "adaptive_queries" + ("_quick" if args.quick else "")
    name += "" if device.type == "cpu" else f"_{device.type}"
    name += "" if args.seed == 0 else f"_seed{args.seed}"
    name += ".json"
    Path(f"benchmarks/results/{name}").write_text(
        json.dumps({"images": len(x), "rows": table, **result, "per_image": per_image}, indent=2)
    )


def accuracy_interval(ok: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval for a certified accuracy over the images."""
    ci = binomtest(int(ok.sum()), len(ok)).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
