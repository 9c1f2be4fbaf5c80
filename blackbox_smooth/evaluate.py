"""`bbsmooth evaluate`: certify a labelled data set and report what papers report.

Writes, in `--out`: `certify.tsv` with Cohen et al.'s columns (`idx label predict radius correct
time`, so their analysis scripts read it) plus the queries each image used and sent;
`summary.json` (certified accuracy on a grid of radii, average certified radius, abstain rate,
clean accuracy of the smoothed classifier, queries, cost, wall time); `certified_accuracy.png`.
Images are certified concurrently so the endpoint stays busy; files are replaced whole, and an
interrupted evaluation resumes from the cache when run again.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .blackbox import MAX_CLASSES
from .data import STRETCH, Fit, list_images, load_image
from .errors import UsageError, first_error
from .inputs import MAX_CSV_BYTES, read_text
from .redaction import printable
from .runfolder import EVALUATION, PNG_SOFTWARE, write_atomically, write_file_atomically

TSV = "certify.tsv"
SUMMARY = "summary.json"
PLOT = "certified_accuracy.png"
COLUMNS = ["idx", "label", "predict", "radius", "correct", "time", "queries", "sent", "fresh",
           "looks", "alpha_effective"]  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    paths: list[str]  # every image, in a stable order; `idx` is the position here
    labels: list[int]
    classes: list[str]


@dataclass(frozen=True)
class Row:
    idx: int
    label: int
    predict: int  # -1: abstained
    radius: float
    correct: int
    time: float
    queries: int  # samples used (n0 + n, or fewer when adaptive stopped early)
    sent: int  # of which sent now (the rest replayed from the cache)
    fresh: int = 1  # 0: the image was looked at before under this model (ledger.py)
    looks: int = 1  # attempts on the image under this model up to this one
    alpha_effective: float = 0.0  # α under a union bound over those attempts (0: not known)


def load_dataset(data: str | os.PathLike[str], classes: Sequence[str] | None = None) -> Dataset:
    """A folder with one sub-folder per class (the folder name is the class), or a CSV of
    `path,label` rows (paths relative to the CSV). `classes` fixes the class order (default:
    sorted names, as `train --data` numbers them); a label may also be a class index. A CSV
    whose labels are all integers needs no `classes`: each label is its class index."""
    data = Path(data)
    if data.is_dir():
        paths, indices, names = list_images(data)
        if indices is None:
            raise UsageError(f"--data {data} has no sub-folders: make one per class")
        pairs = [(path, names[i]) for path, i in zip(paths, indices, strict=True)]
    elif os.path.lexists(data):  # a CSV; a FIFO or a device is refused, not waited on
        pairs = _read_csv(data)
        if not classes and pairs:
            return _indexed(data, pairs)
        names = sorted({label for _, label in pairs})
    else:
        raise UsageError(f"--data {data} not found: give a folder of class sub-folders or a CSV")
    if not pairs:
        raise UsageError(f"--data {data} holds no images")
    order = list(classes) if classes else names
    index = {name: i for i, name in enumerate(order)}
    labels = []
    for path, label in pairs:
        if label in index:
            labels.append(index[label])
        elif _is_index(label) and (classes is None or int(label) < len(order)):
            labels.append(int(label))
        else:
            raise UsageError(
                f"class {label!r} of {path} is not among --classes ({', '.join(order)})"
            )
    return Dataset([p for p, _ in pairs], labels, order)


def _is_index(label: str) -> bool:
    # ASCII digits only ("²" is a digit to str.isdigit), and short: int() of thousands of
    # digits raises
    return label.isascii() and label.isdigit() and len(label) <= 12


def _indexed(data: Path, pairs: list[tuple[str, str]]) -> Dataset:
    """A CSV without --classes. Integer labels are class indices as written ("10" is class
    10, not the third name in sorted order); names are numbered in sorted order; a mix of the
    two has no order we could guess, so it is refused."""
    numbers = [label for _, label in pairs if _is_index(label)]
    if not numbers:
        names = sorted({label for _, label in pairs})
        index = {name: i for i, name in enumerate(names)}
        return Dataset([p for p, _ in pairs], [index[label] for _, label in pairs], names)
    if len(numbers) < len(pairs):
        name = next(label for _, label in pairs if not _is_index(label))
        raise UsageError(
            f"--data {data} mixes class indices ({numbers[0]!r}) and class names "
            f"({printable(name, 40)!r}): give --classes NAME,… in index order"
        )
    labels = [int(label) for label in numbers]
    if max(labels) >= MAX_CLASSES:
        raise UsageError(
            f"--data {data} has class index {max(labels):,}: indices run 0..{MAX_CLASSES - 1:,}"
        )
    # names for every index up to the largest, so that class k is always `classes[k]`
    return Dataset([p for p, _ in pairs], labels, [str(k) for k in range(max(labels) + 1)])


def _read_csv(path: Path) -> list[tuple[str, str]]:
    text = read_text(path, "--data", MAX_CSV_BYTES, "a path,label CSV or a folder of classes")
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and r[0].strip()]
    except csv.Error as e:  # a field over csv's 131,072-character limit, …
        raise UsageError(f"--data {path} is not a readable path,label CSV ({e})") from None
    if rows and [c.strip().lower() for c in rows[0]] == ["path", "label"]:
        rows = rows[1:]
    out = []
    for number, row in enumerate(rows, 1):
        if len(row) != 2:
            raise UsageError(f"{path} row {number}: write 'path,label'")
        image = Path(row[0].strip())
        out.append((str(image if image.is_absolute() else path.parent / image), row[1].strip()))
    return out


def select(total: int, skip: int = 0, every: int = 1, limit: int | None = None) -> list[int]:
    """The indices the papers' subsets take: from `skip`, every `every`-th, at most `limit`
    (checked by options.DatasetOptions)."""
    chosen = list(range(skip, total, every))
    return chosen[:limit] if limit is not None else chosen


def cost(queries: int, price_per_1000: float | None) -> str:
    return "" if price_per_1000 is None else f" (cost {queries / 1000 * price_per_1000:,.2f})"


async def run(
    certify: Callable[..., Any],
    dataset: Dataset,
    indices: list[int],
    load: Callable[[str], np.ndarray],
    images_in_flight: int = 4,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Certify the chosen images, a few at a time; rows sorted by idx. Nothing is written
    here: the report replaces the previous one whole at the end (`write_report`), so a failed
    or interrupted run leaves the previous outputs as they were (the cache keeps its answers)."""
    rows: list[Row] = []
    gate = asyncio.Semaphore(images_in_flight)

    async def one(i: int) -> None:
        async with gate:
            x = load(dataset.paths[i])
            cert = await certify(x)
        rows.append(row_of(i, dataset.labels[i], cert))
        if on_row:
            on_row(rows[-1])

    try:
        async with asyncio.TaskGroup() as group:
            for i in indices:
                group.create_task(one(i))
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    return sorted(rows, key=lambda r: r.idx)


def row_of(i: int, label: int, cert: Any) -> Row:
    """The TSV row of image `i` (true class `label`) from its Certificate."""
    return Row(
        idx=i,
        label=label,
        predict=cert.label,
        radius=cert.radius,
        correct=int(cert.label == label),
        time=cert.seconds,
        queries=cert.n0 + cert.n,
        sent=cert.queries_sent,
        fresh=int(cert.fresh),
        looks=cert.looks,
        alpha_effective=cert.alpha_effective,
    )


def tsv(rows: list[Row]) -> bytes:
    lines = ["\t".join(COLUMNS)]
    for r in sorted(rows, key=lambda r: r.idx):
        elapsed = str(datetime.timedelta(seconds=round(r.time, 4)))
        lines.append(
            f"{r.idx}\t{r.label}\t{r.predict}\t{r.radius:.4f}\t{r.correct}\t{elapsed}\t"
            f"{r.queries}\t{r.sent}\t{r.fresh}\t{r.looks}\t{r.alpha_effective:.6g}"
        )
    return ("\n".join(lines) + "\n").encode()


def write_report(out: Path, rows: list[Row], summary: dict[str, Any]) -> None:
    """certify.tsv, summary.json and the plot, swapped in for the previous report as one."""

    def write(folder: Path) -> None:
        (folder / TSV).write_bytes(tsv(rows))
        (folder / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        plot([(legend_of(summary), rows)], folder / PLOT, f"{len(rows)} images")

    write_atomically(out, write, EVALUATION)


def tsv_of(run: Path) -> Path:
    """The certify.tsv of a run: the file itself, or the one inside an evaluation folder."""
    if not run.is_dir():
        return run
    if not (run / TSV).is_file():
        raise UsageError(
            f"{run} is a folder without a {TSV}: give an `evaluate --out` folder or a TSV file"
        )
    return run / TSV


def read_tsv(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a certify.tsv (ours, or Cohen et al.'s without the query columns)."""
    lines = read_text(path, "certification TSV", MAX_CSV_BYTES).splitlines()
    if not lines:
        raise UsageError(f"{path} is empty")
    head = lines[0].split("\t")
    missing = {"idx", "label", "predict", "radius", "correct"} - set(head)
    if missing:
        raise UsageError(f"{path} is not a certification TSV: no {', '.join(sorted(missing))}")
    rows = []
    for line in lines[1:]:
        v = dict(zip(head, line.split("\t"), strict=False))
        try:
            rows.append(
                Row(
                    idx=int(v["idx"]),
                    label=int(v["label"]),
                    predict=int(v["predict"]),
                    radius=float(v["radius"]),
                    correct=int(v["correct"]),
                    time=_seconds(v.get("time", "0")),
                    queries=int(v.get("queries", 0)),
                    sent=int(v.get("sent", 0)),
                    fresh=int(v.get("fresh", 1)),
                    looks=int(v.get("looks", 1)),
                    alpha_effective=float(v.get("alpha_effective", 0)),
                )
            )
        except (KeyError, ValueError) as e:
            raise UsageError(f"{path}: bad row {printable(line, 60)!r} ({e})") from e
    return rows


def _seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def radii_grid(rows: list[Row], step: float = 0.05) -> np.ndarray:
    top = max([r.radius for r in rows if r.correct] + [0.5])
    return np.round(np.arange(0.0, top + step, step), 4)


def certified_accuracy(rows: list[Row], radii: Sequence[float] | np.ndarray) -> list[float]:
    """Fraction of images predicted correctly and certified at radius ≥ r (r = 0: not
    abstaining and correct)."""
    if not rows:
        return [0.0 for _ in radii]
    correct = np.array([r.correct for r in rows], dtype=bool)
    radius = np.array([r.radius for r in rows])
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def summarize(rows: list[Row], setting: dict[str, Any], seconds: float) -> dict[str, Any]:
    grid = radii_grid(rows)
    n = max(len(rows), 1)
    queries = sum(r.queries for r in rows)
    sent = sum(r.sent for r in rows)
    return {
        **setting,
        "images": len(rows),
        "certified_accuracy": {
            f"{r:.2f}": a for r, a in zip(grid, certified_accuracy(rows, grid), strict=True)
        },
        "average_certified_radius": sum(r.radius for r in rows if r.correct) / n,
        "abstain_rate": sum(r.predict == -1 for r in rows) / n,
        "clean_accuracy": sum(r.correct for r in rows) / n,
        "queries_used": queries,
        "queries_sent": sent,
        "queries_cached": queries - sent,
        "queries_per_image": queries / n,
        "not_fresh": sum(not r.fresh for r in rows),  # rows whose α is their alpha_effective
        "alpha_effective_max": max((r.alpha_effective for r in rows), default=0.0),
        "seconds": seconds,
    }


def plot(runs: list[tuple[str, list[Row]]], path: str | os.PathLike[str], title: str = "") -> None:
    """Certified accuracy against radius, one curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in runs:
        grid = np.linspace(0, max(radii_grid(rows)), 200)
        ax.plot(grid, certified_accuracy(rows, grid), label=name)
    ax.set_xlabel("l2 radius ([0,1] pixel scale)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    # the Software chunk marks the file as ours: `plot --out` replaces only such files
    fig.savefig(buffer, format="png", dpi=120, metadata={"Software": PNG_SOFTWARE})
    plt.close(fig)
    write_file_atomically(path, buffer.getvalue())


def legend(tsv: str | os.PathLike[str]) -> str:
    """A run's name for a plot: σ, front end and method from its summary.json, else the file."""
    summary = Path(tsv).with_name(SUMMARY)
    if not summary.is_file():
        return Path(tsv).stem
    try:
        return legend_of(json.loads(read_text(summary, "a run's summary.json", 1 << 20)))
    except (UsageError, ValueError, AttributeError):
        return Path(tsv).stem  # not a summary we can read: the file name will do


def legend_of(s: dict[str, Any]) -> str:
    front = s.get("method") or s.get("frontend") or "no front end"
    parts = [f"σ={s.get('sigma')}", front]
    if s.get("mode", "fixed") != "fixed":
        parts.append(str(s["mode"]))
    return ", ".join(str(p) for p in parts)


def check_images(
    dataset: Dataset, indices: list[int], load: Callable[[str], np.ndarray]
) -> tuple[int, ...]:
    """Decode every chosen image before a query is sent, so a broken file stops the run with
    nothing spent and nothing written; returns the first image's shape."""
    first = load(dataset.paths[indices[0]]).shape
    for i in indices[1:]:
        load(dataset.paths[i])  # raises UsageError naming the file
    return tuple(first)


def load_for(
    size: tuple[int, int] | None, grayscale: bool, fit: Fit = STRETCH
) -> Callable[[str], np.ndarray]:
    def load(path: str) -> np.ndarray:
        return load_image(path, size, grayscale, fit)

    return load
