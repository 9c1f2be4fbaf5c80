"""The evaluate job: certify a labelled data set, here or on Ray workers, and write its report
(certify.tsv, summary.json, the certified-accuracy plot)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import evaluate as ev
from ..adapters import LabelMap
from ..cache import BlockCache, default_cache_dir
from ..cluster import certify_rows, ray_module
from ..data import Fit, parse_size
from ..errors import UsageError, warn
from ..frontends.base import read_config
from ..options import (
    CertifyOptions,
    ClusterOptions,
    DatasetOptions,
    EndpointOptions,
    ImageOptions,
    SmoothingOptions,
)
from ..progress import Progress, no_progress
from ..runfolder import EVALUATION, claim
from .assembly import files_read, open_smoothed, run_then_close
from .images import REUSED, REUSED_FIX


@dataclass(frozen=True)
class Evaluation:
    rows: list[ev.Row]
    summary: dict[str, Any]
    out: Path


def evaluation_images(dataset: DatasetOptions, wire: EndpointOptions) -> tuple[Any, list[int]]:
    """The data set (class order from --classes, else the label map's, else sorted names)
    and the indices of the images chosen."""
    order = dataset.class_order
    if order is None and wire.labels is not None:
        order = list(LabelMap.load(str(wire.labels)).classes) or None
    data = ev.load_dataset(dataset.data, order)
    return data, ev.select(len(data.paths), dataset.skip, dataset.every, dataset.limit)


def evaluate(
    options: SmoothingOptions,
    dataset: DatasetOptions,
    out: Path,
    plan: CertifyOptions = CertifyOptions(),
    imaging: ImageOptions = ImageOptions(),
    *,
    price_per_1000: float | None = None,
    progress: Progress = no_progress,
    cluster: ClusterOptions = ClusterOptions(),
) -> Evaluation:
    """Certify a labelled data set; write certify.tsv, summary.json and the plot to `out`
    (replaced whole at the end: a failed run leaves the previous report as it was)."""
    data, indices = evaluation_images(dataset, options.wire)
    chosen = [Path(data.paths[i]) for i in indices]
    claim(out, EVALUATION, [dataset.data, *chosen, *files_read(options)])
    if not indices:
        raise UsageError("--skip/--every/--limit select no images")
    size = parse_size(imaging.size)
    load = ev.load_for(size, imaging.grayscale, Fit.of(imaging))
    shape = ev.check_images(data, indices, load)
    start = time.perf_counter()
    if cluster.ray is not None:
        rows = _evaluate_on_ray(options, cluster, data, indices, plan, imaging, size, shape,
                                progress)  # fmt: skip
    else:
        smoothed = open_smoothed(options, shape)
        run = smoothed.certify_adaptive if plan.adaptive else smoothed.certify
        arguments = plan.arguments()

        async def work() -> list[ev.Row]:
            with progress("evaluate", len(indices), "image") as advance:
                return await ev.run(
                    lambda x: run(x, **arguments),
                    data,
                    indices,
                    load,
                    images_in_flight=max(1, options.wire.concurrency // 4),
                    on_row=lambda _: advance(1),
                )

        rows = run_then_close(smoothed, work)
    reused = sum(not r.fresh for r in rows)
    if reused:
        worst = max(r.alpha_effective for r in rows)
        warn(
            f"{reused} of {len(rows)} images are not fresh: {REUSED}; their claims hold at α up "
            f"to {worst:.3g} (the TSV's fresh, looks and alpha_effective columns){REUSED_FIX}"
        )
    setting = {
        "data": str(dataset.data),
        "endpoint": options.endpoint.shown,
        "sigma": options.sigma,
        "n0": plan.n0,
        "n": plan.n_estimation,
        "alpha": plan.alpha,
        "seed": options.seed,
        "mode": plan.mode,
        "target_radius": plan.target_radius,
        "budget": plan.budget,
        "bound": plan.bound.value if plan.adaptive else "cp",
        "frontend": str(options.frontend) if options.frontend else None,
        "method": _method(options.frontend),
        "classes": data.classes,
        "price_per_1000": price_per_1000,
    }
    summary = ev.summarize(rows, setting, time.perf_counter() - start)
    if price_per_1000 is not None:
        summary["cost"] = summary["queries_sent"] / 1000 * price_per_1000
    ev.write_report(out, rows, summary)
    return Evaluation(rows, summary, out)


def _evaluate_on_ray(
    options: SmoothingOptions,
    cluster: ClusterOptions,
    data: Any,
    indices: list[int],
    plan: CertifyOptions,
    imaging: ImageOptions,
    size: tuple[int, int] | None,
    shape: tuple[int, ...],
    progress: Progress,
) -> list[ev.Row]:
    """The rows of `evaluate` from Ray workers (cluster.py), each opening the black box,
    front end and cache as `open_smoothed` does here; the journal of rows done lives in this
    machine's cache."""
    ray_module()  # a missing Ray is one line, before anything starts
    journal = None if options.no_cache else BlockCache(options.cache or default_cache_dir())
    try:
        with progress("evaluate", len(indices), "image") as advance:
            return certify_rows(
                cluster,
                options,
                functools.partial(open_smoothed, options, shape),
                data,
                indices,
                plan,
                size,
                imaging.grayscale,
                journal,
                on_row=lambda _: advance(1),
                fit=Fit.of(imaging),
            )
    finally:
        if journal is not None:
            journal.close()


def _method(frontend: Path | None) -> str | None:
    """How the front end was trained (distill, spsa, whitebox, mse), for plot legends."""
    if frontend is None:
        return None
    config = read_config(frontend)
    return f"{config.kind} {config.method or 'mse'}"
