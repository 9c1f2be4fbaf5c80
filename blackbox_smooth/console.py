"""What a command prints on the console: certify's and predict's table, row by row as images
finish, the queries spent and their cost, and counts with their nouns."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .progress import echo

if TYPE_CHECKING:
    from .jobs.images import ImageResult
    from .training.loop import TrainResult


def print_images(
    run: Callable[[Callable[[ImageResult], None]], list[ImageResult]],
    as_json: bool,
    price: float | None,
    table: Table,
) -> None:
    """A JSON line or a table row as each image finishes (the table's widths are set by the
    file names, known before the first), then the queries spent, also after a failure."""
    done: list[dict[str, Any]] = []

    def show(result: ImageResult) -> None:
        done.append(result.to_json())
        if as_json:
            print(json.dumps(done[-1]), flush=True)
        else:
            table.row(done[-1])

    try:
        run(show)
    finally:
        if not as_json:
            sent = sum(r["queries_sent"] for r in done)
            cached = sum(r["queries_cached"] for r in done)
            print(f"queries: {sent:,} sent{cost(sent, price)}, {cached:,} replayed from cache")


class Table:
    """Rows of certify's or predict's results, printed one by one as images finish. With
    --target-radius R the question is whether each image is certified at R: a column says."""

    def __init__(self, images: list[Path], certificates: bool, target: float | None = None):
        self.certificates, self.target = certificates, target
        head = ["image", "label"]
        least = {"image": max(len(p.name) for p in images), "label": 7, "sent": 7, "cached": 7}
        if target is not None:
            head.append(f"at r={target:g}")
            least[head[-1]] = len("not certified")
        head += ["radius", "p_lower", "max_radius"] if certificates else ["p_value"]
        least["p_value"] = 9
        head += ["sent", "cached", "seconds", "evidence"]
        self.widths = [max(len(h), least.get(h, 6)) for h in head]
        self.head = head
        self.started = False

    def row(self, r: dict[str, Any]) -> None:
        if not self.started:
            self._print(self.head)
            self.started = True
        cells = [Path(r["image"]).name, "abstain" if r["abstain"] else str(r["label"])]
        if self.target is not None:
            held = not r["abstain"] and r["radius"] >= self.target
            cells += ["certified" if held else "not certified"]
        if self.certificates:
            cells += [f"{r['radius']:.3f}", f"{r['p_lower']:.4f}", f"{r['max_radius']:.3f}"]
        else:
            cells += [f"{r['p_value']:.2e}"]
        cells += [f"{r['queries_sent']:,}", f"{r['queries_cached']:,}", f"{r['seconds']:.2f}"]
        # fresh, or which look this was and the α its claim holds at (ledger.py)
        claim = "no claim" if r["alpha_effective"] >= 1 else f"α {r['alpha_effective']:.2g}"
        cells += ["fresh" if r["fresh"] else f"look {r['looks']}, {claim}"]
        self._print(cells)

    def _print(self, cells: list[str]) -> None:
        echo("  ".join(c.ljust(w) for c, w in zip(cells, self.widths, strict=True)).rstrip())


def cost(queries: int, price: float | None) -> str:
    return "" if price is None else f" (cost {queries / 1000 * price:,.2f})"


def print_dry_run(images: int, per_image: int, price: float | None) -> None:
    total = images * per_image
    print(
        f"dry run: at most {total:,} queries ({count(images, 'image')} × {per_image:,})"
        f"{cost(total, price)}"
        "; nothing sent (answers already cached cost nothing)"
    )


def print_training(result: TrainResult) -> None:
    """What was trained and spent; validation on the black box, epoch by epoch, with 95%
    intervals; which state was kept."""
    config, record = result.config, result.record
    lora_note = f", LoRA rank {config.lora_rank}" if config.lora_rank else ""
    before = record.queries - result.sent
    spent = count(record.queries, "query", "queries")
    if record.queries and before:
        spent += f" ({result.sent:,} sent now, {before:,} answered before: cache or earlier run)"
    print(
        f"trained {config.kind} ({config.trainable_parameters:,} trainable parameters{lora_note}) "
        f"with {config.method or 'mse'} / {config.objective}: {spent}, {result.seconds:.0f}s"
    )
    if not record.validation:
        return
    print("epoch  noisy_accuracy  95% interval   vs start (95% interval)  all draws right  queries")
    for row in record.validation:
        low, high = row.get("interval", (math.nan, math.nan))
        gain, gain_low, gain_high = row.get("vs_start", (math.nan, math.nan, math.nan))
        vs = f"{gain:+.3f} ({gain_low:+.3f}, {gain_high:+.3f})" if row["epoch"] else "·"
        steady = row.get("consistency", [math.nan])[-1]
        mark = "  ← kept" if row["epoch"] == record.best_epoch else ""
        print(
            f"{row['epoch']:<5}  {row['noisy_accuracy']:<14.3f}  {low:.3f}–{high:.3f}    "
            f"{vs:<23}  {steady:<15.3f}  {row.get('queries', '')}{mark}"
        )
    if record.stopped_early is not None:
        print(f"stopped early after epoch {record.stopped_early}: validation stopped improving")


def count(k: int, one: str, many: str | None = None) -> str:
    """'1 image', '2 images': numbers with the noun they count."""
    return f"{k:,} {one if k == 1 else many or one + 's'}"
