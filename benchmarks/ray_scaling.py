"""`evaluate --ray`: images/s with 1, 2 and 4 Ray workers and without Ray, against a loopback
endpoint whose every answer takes DELAY seconds (`bbsmooth serve --delay`, a process of its
own), so that the server's latency, not this machine's 2 cores, sets the pace: each worker keeps
--concurrency requests in flight, so more workers keep more in flight. The same seed every
time; each run's TSV is compared with the one without Ray (every column but time).

The rows alternate, round after round (benchmarks/timing.py). A Ray run's time includes
starting its workers (each imports torch and opens the black box); the cluster is started once.

`RESULT` keys: `ray_overhead` (1 worker ÷ no Ray, goal ≥ 0.9), `scaling_2_workers` (2 ÷ 1,
goal ≥ 1.8 where the endpoint allows it), `scaling_4_workers`, `identical_results` (1 when
every TSV matches).

Run: `make bench-ray` (or .venv/bin/python -m benchmarks.ray_scaling [--images N]).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.timing import alternate, speed_ratio, spread
from blackbox_smooth import jobs
from blackbox_smooth.digits import train_digits_model
from blackbox_smooth.options import (
    CertifyOptions,
    ClusterOptions,
    DatasetOptions,
    EndpointOptions,
    SmoothingOptions,
)
from blackbox_smooth.serve import ServerProcess
from tests.harness import write_digits_folder

SIGMA, N0, N, BATCH, CONCURRENCY = 0.5, 20, 200, 55, 4  # 5 requests per image
KEEP = ["idx", "label", "predict", "radius", "correct", "queries"]


def columns(tsv: Path) -> list[list[str]]:
    lines = tsv.read_text().splitlines()
    head = lines[0].split("\t")
    return [[row.split("\t")[head.index(c)] for c in KEEP] for row in lines[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per answer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = train_digits_model(root / "model")
        data = write_digits_folder(root / "data", args.images)
        with ServerProcess(f"torch:{model}", "digits", delay=args.delay) as server:
            wire = EndpointOptions(batch=BATCH, concurrency=CONCURRENCY)
            options = SmoothingOptions(server.url, SIGMA, no_cache=True, wire=wire)
            dataset = DatasetOptions(data, limit=args.images)
            plan = CertifyOptions(n0=N0, n=N)
            outs: dict[str, Path] = {}
            steady: dict[str, list[float]] = {}

            def run(name: str, workers: int | None) -> None:
                outs[name] = root / name.replace(" ", "-")
                cluster = ClusterOptions(ray="auto", workers=workers) if workers else None
                rows: list[float] = []

                @contextmanager
                def clock(*_: object) -> Iterator[Callable[[int], None]]:
                    yield lambda k: rows.append(time.perf_counter())

                jobs.evaluate(options, dataset, outs[name], plan, progress=clock,
                              cluster=cluster or ClusterOptions())  # fmt: skip
                # rows/s from the first row to the last: the pace once the workers are up
                steady.setdefault(name, []).append((len(rows) - 1) / (rows[-1] - rows[0]))

            rows = {"no Ray": lambda: run("no Ray", None)}
            for w in (1, 2, 4):
                name = f"{w} worker{'s' * (w > 1)}"
                rows[name] = lambda w=w, name=name: run(name, w)
            seconds = alternate(rows, args.rounds)
            same = all(columns(outs[n] / "certify.tsv") == columns(outs["no Ray"] / "certify.tsv")
                       for n in outs)  # fmt: skip
    ray.shutdown()

    ratios = {
        "ray_overhead": speed_ratio(seconds["1 worker"], seconds["no Ray"]),
        "scaling_2_workers": speed_ratio(seconds["2 workers"], seconds["1 worker"]),
        "scaling_4_workers": speed_ratio(seconds["4 workers"], seconds["1 worker"]),
    }
    print(f"{args.images} digits, n0={N0} n={N}, --batch {BATCH} --concurrency {CONCURRENCY}, "
          f"{args.delay} s per answer, median of {args.rounds} alternations")  # fmt: skip
    for name, times in seconds.items():
        print(f"  {name:<10} {args.images / statistics.median(times):6.1f} images/s  "
              f"({statistics.median(times):.1f} s a run; once started "
              f"{statistics.median(steady[name]):.1f} images/s)")  # fmt: skip
    pace = statistics.median(steady["2 workers"]) / statistics.median(steady["1 worker"])
    for key, ratio in ratios.items():
        print(f"  {key:<18} {spread(ratio)}")
    print(f"  2 ÷ 1 once started {pace:.2f} (the rest is the workers' start: torch, the box)")
    print(f"  identical TSVs     {'yes' if same else 'NO'}")
    print("RESULT " + " ".join(f"{k}={v[0]:.3g}" for k, v in ratios.items())
          + f" scaling_2_workers_started={pace:.3g} identical_results={int(same)}")  # fmt: skip


if __name__ == "__main__":
    main()
