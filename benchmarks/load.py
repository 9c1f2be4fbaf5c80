"""Load: `bbsmooth evaluate` of 200 held-out digits × 2,000 samples at --concurrency 64 against
a loopback Open Inference Protocol server, watched from outside: every vote accounted for
(the server's count of classified images against the report's), peak memory of the evaluate
process, its file descriptors and sockets sampled over the run, the server's open connections.

Baselines, in the same run: the same evaluate with n = 200, and the first 20 images with
n = 20,000. Noise is drawn in blocks (1,024 samples) and the blocks drawn but not yet answered
are capped for the whole run (votes.IN_FLIGHT_BYTES, 256 MiB), so peak memory grows with n only
until that cap is reached and never past it: `rss_ratio` is the peak at n = 20,000 ÷ the peak at
n = 2,000. File descriptors in the last quarter of a run's busy part are no more than in its
first half (`fd_growth` 0: no leak), and no connection stays open on the server once evaluate
has exited.

Run: `make bench-load` (or, from the repository root,
.venv/bin/python -m benchmarks.load [--images N]).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.demo import DEMO_DIR
from blackbox_smooth.digits import train_digits_model
from blackbox_smooth.serve import InferenceServer
from tests.harness import Watched, watch, write_digits_folder

CONCURRENCY = 64


def evaluate_under_watch(url: str, data: Path, out: Path, n: int, images: int) -> Watched:
    return watch(["evaluate", "--data", data, "-e", url, "--sigma", "0.25", "--n0", "100",
                  "--n", n, "--limit", images, "--out", out, "--no-cache", "--batch", "50",
                  "--concurrency", CONCURRENCY])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    model = TorchModel.from_torchscript(str(train_digits_model(DEMO_DIR)), torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, InferenceServer(model, name="digits") as server:
        data = write_digits_folder(Path(tmp) / "data", args.images)
        for n, images in ((200, args.images), (2000, args.images), (20_000, min(20, args.images))):
            before = server.images
            server.peak_connections = server.connections
            w = evaluate_under_watch(server.url, data, Path(tmp) / f"n{n}", n, images)
            if w.returncode != 0:
                sys.exit(f"evaluate failed: {w.stderr.strip()}")
            time.sleep(0.5)  # the server notices the closed connections
            summary = json.loads((Path(tmp) / f"n{n}" / "summary.json").read_text())
            rows.append({
                "n": n, "images": summary["images"], "votes_sent": summary["queries_sent"],
                "votes_answered": server.images - before,
                "expected": images * (100 + n), "peak_rss_mib": w.peak_rss_mib,
                "max_fds": max(w.fds), "max_sockets": max(w.sockets), "fd_growth": w.fd_growth,
                "peak_connections": server.peak_connections,
                "open_after": server.connections,
                "seconds": w.seconds,
            })  # fmt: skip
    head = (f"{'run':<9} {'images':>6} {'votes sent':>11} {'answered':>10} {'expected':>10} "
            f"{'peak RSS MiB':>12} {'max fds':>8} {'sockets':>8} {'fd growth':>9} "
            f"{'peak conns':>10} {'open after':>10} {'s':>5}")  # fmt: skip
    print(head)
    for r in rows:
        print(
            f"{'n=' + format(r['n'], ','):<9} {r['images']:>6} {r['votes_sent']:>11,} "
            f"{r['votes_answered']:>10,} {r['expected']:>10,} {r['peak_rss_mib']:>12.0f} "
            f"{r['max_fds']:>8} {r['max_sockets']:>8} {r['fd_growth']:>9} "
            f"{r['peak_connections']:>10} {r['open_after']:>10} {r['seconds']:>5.0f}"
        )
    _, load, long = rows
    lost = sum(abs(r["votes_sent"] - r["votes_answered"]) + abs(r["votes_sent"] - r["expected"])
               for r in rows)  # fmt: skip
    result = {
        "votes_lost": lost,
        "rss_ratio": long["peak_rss_mib"] / load["peak_rss_mib"],
        "peak_rss_mib": load["peak_rss_mib"],
        "fd_growth": max(r["fd_growth"] for r in rows),
        "peak_connections": max(r["peak_connections"] for r in rows),
        "open_connections_after": max(r["open_after"] for r in rows),
    }
    out = Path(__file__).resolve().parent / "results" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, **result}, indent=2) + "\n")
    figures = (f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    print("RESULT " + " ".join(figures))


if __name__ == "__main__":
    main()
