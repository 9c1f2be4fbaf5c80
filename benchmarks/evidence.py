"""What the evidence ledger and the cache that reads only what it wrote cost, and what the
ledger buys, each measured in one run on this machine:

- `cache info` and `cache clear` on 200,000 entries by SQL aggregates, against reading and
  checking every entry (what a cache that counts by reading must do);
- a certificate's time with the ledger recording its look, against none (a tiny image and an
  in-process black box, so that the ledger's SQLite transaction is all that differs);
- "retry with another seed until it certifies" through the library, on a linear black box whose
  exact radius is known: the wrong-certificate rate of every fresh certificate (each image's
  first attempt), of the reported certificates, and of the reported ones marked not fresh, with
  95% Clopper–Pearson intervals.

Run: make bench-evidence (python -m benchmarks.evidence)."""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from blackbox_smooth import jobs, stats
from blackbox_smooth.blackbox import Answer
from blackbox_smooth.cache import DATABASE, TABLE, BlockCache, Seal, decode
from blackbox_smooth.ledger import Ledger
from blackbox_smooth.smooth import Smoothed
from tests.test_ledger_coverage import ALPHA, ATTEMPTS, N0, X0, Linear, N, images, wrong


def _seconds(run, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def cache_figures(folder: Path, entries: int) -> list[tuple[str, str]]:
    cache = folder / "cache"
    store = BlockCache(cache, Seal(None))
    answer = Answer(np.arange(64) % 10)
    store.put_many([(f"k{i}", answer) for i in range(entries)])
    store.close()

    def read_every_entry() -> int:
        seal, total = Seal(None), 0
        with sqlite3.connect(cache / DATABASE) as db:
            for key, value in db.execute(f"SELECT key, value FROM {TABLE}"):
                body = seal.open(key, value)
                found = None if body is None else decode(body)
                total += 0 if found is None else len(found.labels)
        return total

    ours = _seconds(lambda: jobs.cache_info(cache))
    baseline = _seconds(read_every_entry)
    copy = folder / "copy"
    copy.mkdir()
    (copy / DATABASE).write_bytes((cache / DATABASE).read_bytes())
    start = time.perf_counter()
    cleared, _ = jobs.clear_cache(copy)
    clear = time.perf_counter() - start
    assert cleared == 64 * entries
    return [
        (f"cache info, {entries:,} entries (SQL aggregates)", f"{ours:.3f} s"),
        ("  baseline: read and check every entry", f"{baseline:.3f} s"),
        ("  ratio ours / baseline", f"{ours / baseline:.4f}"),
        (f"cache clear, {entries:,} entries (rows, then VACUUM)", f"{clear:.3f} s"),
    ]


def ledger_figures(folder: Path, count: int) -> list[tuple[str, str]]:
    xs = images(count, seed=7)

    def per_certificate(ledger: Ledger | None) -> float:
        s = Smoothed(Linear(), 0.5, device="cpu", ledger=ledger)
        s.certify_sync(xs[0], n0=N0, n=N, alpha=ALPHA)  # warm up
        times = []
        for x in xs:
            start = time.perf_counter()
            s.certify_sync(x, n0=N0, n=N, alpha=ALPHA)
            times.append(time.perf_counter() - start)
        s.close()
        return statistics.median(times)

    without = per_certificate(None)
    with_ledger = per_certificate(Ledger(folder / "ledger"))
    return [
        (f"certificate, n0={N0}, n={N}, no ledger (median of {count})", f"{without * 1e3:.2f} ms"),
        ("certificate, its look recorded in the ledger", f"{with_ledger * 1e3:.2f} ms"),
        ("  ratio with / without", f"{with_ledger / without:.2f}"),
        ("  the ledger's cost per certificate", f"{(with_ledger - without) * 1e3:.2f} ms"),
    ]


def _rate(k: int, n: int) -> str:
    low = stats.lower_confidence_bound(k, n, 0.025)
    high = stats.upper_confidence_bound(k, n, 0.025)
    return f"{k}/{n} = {k / max(n, 1):.3f} (95% {low:.3f}–{high:.3f})"


def coverage_figures(folder: Path, count: int) -> list[tuple[str, str]]:
    ledger = Ledger(folder / "coverage")
    by_seed = [
        Smoothed(Linear(), 0.5, seed=s, device="cpu", ledger=ledger) for s in range(ATTEMPTS)
    ]
    first_wrong = 0
    reported = []
    for x in images(count, seed=11):
        for s in by_seed:
            cert = s.certify_sync(x, n0=N0, n=N, alpha=ALPHA)
            first_wrong += cert.fresh and wrong(cert)
            if cert.radius >= X0:
                break
        reported.append(cert)
    stale = [c for c in reported if not c.fresh]
    return [
        (f"retry up to {ATTEMPTS} seeds until certified at the true radius, α = {ALPHA}", ""),
        ("  every first attempt (fresh) wrong", _rate(first_wrong, count)),
        ("  reported certificates wrong", _rate(sum(map(wrong, reported)), count)),
        ("  reported and not fresh, wrong", _rate(sum(map(wrong, stale)), len(stale))),
        (
            "  mean alpha_effective of the non-fresh",
            f"{np.mean([c.alpha_effective for c in stale]):.3f}",
        ),  # noqa: E501
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--certificates", type=int, default=300)
    parser.add_argument("--images", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = cache_figures(folder, args.entries)
        rows += ledger_figures(folder, args.certificates)
        rows += coverage_figures(folder, args.images)
    width = max(len(name) for name, _ in rows)
    print(f"{'figure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
