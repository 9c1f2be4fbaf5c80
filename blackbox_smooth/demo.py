"""`make demo`: the main job end to end on the embedded default.

1. train (once, cached in .demo/) a small CNN on scikit-learn's real handwritten digits,
   upsampled to 28×28 — the black box, never trained on noise;
2. serve it over the Open Inference Protocol on 127.0.0.1 with `bbsmooth serve` (a process
   of its own, as a remote black box would be);
3. certify held-out digits over HTTP at σ = 0.5 with no front end;
4. the zero-query start: a denoiser pre-trained with MSE on the images alone; certify with it;
5. train the denoiser further against the endpoint from its answers alone (`distill`,
   ≤ 20,000 queries, unlabeled training images), keeping the best state validated on it;
6. certify the same digits with the trained front end; print the three side by side, each
   with the queries its training cost, and plot the three curves.

Steps 3-6 are the library calls `bbsmooth certify` and `bbsmooth train` make (jobs/).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import jobs
from .data import save_image
from .digests import file_digest
from .digits import digits_split, train_digits_model
from .endpoint import Endpoint
from .errors import BBSmoothError, StaleRun
from .options import (
    CertifyOptions,
    EndpointOptions,
    SmoothingOptions,
    TrainSettings,
    default_of,
)
from .progress import progress_bar
from .redaction import printable, redact
from .runfolder import FRONTEND, remove
from .serve import ServerProcess, free_port

DEMO_DIR = Path(".demo")


def plot_certified_accuracy(
    runs: dict[str, list[dict[str, Any]]], truth: list[int], path: Path
) -> Path:
    """Certified accuracy against radius, one curve per run: the share of images labelled
    correctly and certified at a radius of at least r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    first = next(iter(runs.values()))[0]
    grid = np.linspace(0, first["max_radius"] * 1.1, 300)
    for label, records in runs.items():
        radii = np.array(
            [r["radius"] if r["label"] == t else -1.0 for r, t in zip(records, truth, strict=True)]
        )
        ax.plot(grid, [(radii >= g).mean() for g in grid], lw=2, label=label)
    ax.axvline(first["max_radius"], ls=":", c="gray", label="max radius for (n, α)")
    ax.set(xlabel="l2 radius (pixel scale [0,1], 28×28)", ylabel="certified accuracy")
    ax.set(
        ylim=(0, 1.05),
        title=f"{len(truth)} held-out digits, σ = {first['sigma']}, n = {first['n']}",
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_image(x: np.ndarray, path: Path) -> Path:
    """One digit as a PNG, kept when a run before wrote it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(x, path)
    return path


def _write_images(x: np.ndarray, y: np.ndarray | None, folder: Path, prefix: str) -> list[Path]:
    return [
        _write_image(x[i], folder / f"{prefix}{i:04d}{'' if y is None else f'_true{y[i]}'}.png")
        for i in range(len(x))
    ]


HELDOUT = 100  # further held-out digits, labelled by folder: a data set to evaluate


def write_inputs(folder: Path, count: int) -> list[Path]:
    """The images the demo reads, left for the examples of the README and the docs:
    `digits/` (the `count` held-out digits it certifies, each named with its true class),
    `train/` (the training digits, unlabeled: stability needs no labels) and `heldout/` (the
    next HELDOUT held-out digits, a sub-folder per class: a labelled set for `evaluate`)."""
    x_tr, _, x_te, y_te = digits_split()
    files = _write_images(x_te[:count], y_te[:count], folder / "digits", "digit")
    _write_images(x_tr, None, folder / "train", "train")
    for i in range(count, count + HELDOUT):
        _write_image(x_te[i], folder / "heldout" / str(y_te[i]) / f"digit{i:04d}.png")
    return files


@dataclass(frozen=True)
class Plan:
    """What the demo runs; the tests run a smaller one in a folder of their own."""

    folder: Path = DEMO_DIR
    count: int = 24  # held-out digits certified
    n: int = 2_000  # estimation samples per digit
    max_queries: int = 20_000  # the training budget
    epochs: int = default_of(TrainSettings, "epochs")
    pretrain_epochs: int = default_of(TrainSettings, "pretrain_epochs")
    passes: int = default_of(TrainSettings, "passes")  # over the images, per epoch
    port: int = 18080  # the first choice; any free port otherwise


SIGMA = 0.5


def _certify(options: SmoothingOptions, files: list[Path], n: int) -> list[dict[str, Any]]:
    results = jobs.certify(options, files, CertifyOptions(n=n), progress=progress_bar)
    return [r.to_json() for r in results]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(options: SmoothingOptions, settings: TrainSettings, data: Path, run: Path) -> Any:
    """`bbsmooth train … --resume`: a run left by an earlier demo goes on where it stopped;
    one made for other settings (an older demo, another model) is the demo's own, so it is
    trained again rather than refused."""
    try:
        return jobs.train(options, settings, data, run, resume=True, log=_log,
                          progress=progress_bar)  # fmt: skip
    except StaleRun as e:
        _log(f"    {run} is from an earlier demo ({e}): training it again")
    remove(run, FRONTEND)
    return jobs.train(options, settings, data, run, log=_log, progress=progress_bar)


def _report(
    columns: dict[str, tuple[list[dict[str, Any]], int]], folder: Path, start: float
) -> None:
    """Each digit's certificate under each front end, the certified accuracies, the plot."""
    truth = [int(Path(r["image"]).stem.split("true")[1]) for r in columns["no front end"][0]]
    print()
    print(f"{'image':<22}{'true':>5}   " + "".join(f"{name[:17]:<19}" for name in columns))
    for k, t in enumerate(truth):
        cells = []
        for records, _ in columns.values():
            r = records[k]
            cells.append("abstain" if r["abstain"] else f"{r['label']}  r={r['radius']:.3f}")
        name = Path(columns["no front end"][0][k]["image"]).name
        print(f"{name:<22}{t:>5}   " + "".join(f"{c:<19}" for c in cells))
    print()
    for label, (records, trained_with) in columns.items():
        radii = [
            r["radius"] if r["label"] == t else -1 for r, t in zip(records, truth, strict=True)
        ]
        at = {r: np.mean([x >= r for x in radii]) for r in (0.25, 0.5, 1.0)}
        print(
            f"{label:<17} certified accuracy r≥0.25: {at[0.25]:.2f}  r≥0.5: {at[0.5]:.2f}  "
            f"r≥1.0: {at[1.0]:.2f}   (training: {trained_with:,} queries)"
        )
    sent = sum(r["queries_sent"] for records, _ in columns.values() for r in records)
    plot = plot_certified_accuracy(
        {
            f"{label} ({cost:,} training queries)": records
            for label, (records, cost) in columns.items()
        },
        truth,
        folder / "certified.png",
    )
    print(
        f"certification: {sent:,} queries sent now. plot: {plot}. Done in "
        f"{time.perf_counter() - start:.0f}s. Each radius is an l2 ball (in [0,1] pixel units, "
        f"at 28×28) where the smoothed label cannot change, with probability ≥ 0.999. Run "
        f"again: every answer replays from {folder}/cache."
    )


def main(plan: Plan = Plan()) -> None:
    start = time.perf_counter()
    folder, count, n = plan.folder, plan.count, plan.n
    print(f"1/6 the black box: a small CNN trained on clean 28×28 digits (cached in {folder}/)")
    model_path = train_digits_model(folder)
    meta = json.loads((folder / "digits_cnn.json").read_text())
    print(f"    clean accuracy on the 500 held-out digits: {meta['test_accuracy']:.3f}")
    files = write_inputs(folder, count)
    train_dir = folder / "train"

    # The model's digest in its name: a retrained model is another endpoint, never a cache hit.
    # The port is whatever is free (18080 if it can), so the endpoint is known by a name that
    # holds the digest, not by its URL: a rerun on another port still finds its cache.
    name = f"digits-{file_digest(str(model_path))[:8]}"

    with ServerProcess(f"torch:{model_path}", name, port=free_port(plan.port)) as server:
        print(f"2/6 serving it over the Open Inference Protocol at {server.url}")
        print(f"3/6 certifying {count} held-out digits with no front end (σ={SIGMA}, n={n})")
        # what `bbsmooth certify … --batch 250 --cache .demo/cache --endpoint-id …` builds
        wire = EndpointOptions(batch=250, endpoint_id=f"bbsmooth-demo/{name}")
        options = SmoothingOptions(
            Endpoint.parse(server.url), SIGMA, cache=folder / "cache", wire=wire
        )
        columns = {"no front end": (_certify(options, files, n), 0)}
        print("4/6 the zero-query start: a denoiser pre-trained on the images alone (MSE)")
        settings = TrainSettings(SIGMA, epochs=plan.epochs, pretrain_epochs=plan.pretrain_epochs,
                                 passes=plan.passes)  # fmt: skip
        start_run = folder / "start"
        _train(options, replace(settings, objective="mse"), train_dir, start_run)
        columns["zero-query start"] = (_certify(replace(options, frontend=start_run), files, n), 0)
        run = folder / "frontend"
        print(f"5/6 $ bbsmooth train --endpoint … --data {train_dir} --sigma {SIGMA} "
              f"--start {start_run} --out {run}")  # fmt: skip
        # from the start of step 4 (`train --start`): one pre-training serves both
        distill = replace(settings, max_queries=plan.max_queries, start=start_run)
        trained = _train(options, distill, train_dir, run)
        config, record = trained.config, trained.record
        print(
            f"    {config.kind} front end, {config.trainable_parameters} trainable parameters: "
            f"{record.queries:,} queries ({trained.sent:,} sent now), kept epoch "
            f"{record.kept_epoch} (the best validated on the black box), {trained.seconds:.0f}s"
        )
        print(f"6/6 certifying the same {count} digits with the trained front end")
        columns["distill"] = (_certify(replace(options, frontend=run), files, n), record.queries)

    _report(columns, folder, start)


if __name__ == "__main__":
    try:
        main()
    except BBSmoothError as e:  # one line and the CLI's exit code, as `bbsmooth` gives it
        message = printable(redact(" ".join(str(e).split())), 2000)
        print(f"bbsmooth: error: {message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("bbsmooth: interrupted; run `make demo` again to resume", file=sys.stderr)
        sys.exit(130)
