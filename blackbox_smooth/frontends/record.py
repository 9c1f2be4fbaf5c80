"""The training record: what a run did, apart from what its front end is (base.py).

frontend.json holds both, in the layout every version wrote: the config's fields, and the
record's `queries`, `epochs_done`, `validation` and `extra` (the kept epoch, the confirmation
tallies, the head stage, …). `migrate` is the one reader: it checks every value (a hand-edited
or hostile file is named in one line, not met as a traceback later) and turns any older
layout into the current `TrainingRecord`, so the training loop has no "older run" branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..inputs import is_int, shown, want_float, want_int, want_str

# 1: no version key (the `extra` layout, up to bbsmooth 0.1.0); 2: `record_version` written
RECORD_VERSION = 2


@dataclass(frozen=True)
class StartRecord:
    """The `--start` run this one began from: its weights' digest and how it was trained."""

    weights: str
    method: str


@dataclass
class TrainingRecord:
    """A run's history: queries, validated epochs, and the decisions taken along the way."""

    version: int = RECORD_VERSION
    queries: int = 0  # counted against --max-queries, cached answers included
    epochs_done: int = 0
    validation: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch, 0 first
    best_epoch: int | None = None  # the kept epoch; None until the start is validated
    scored: bool | None = None  # whether the last validation's answers carried scores
    confirmation: dict[str, Any] | None = None  # Confirmation.record()
    head_stage_from: int | None = None  # the epoch after which distill's head stage began
    stopped_early: int | None = None
    start: StartRecord | None = None
    mse_pretrain_loss: float | None = None
    seconds: float | None = None  # set when a call ends; resumed calls add to it
    note: str | None = None

    @property
    def kept_epoch(self) -> int:
        """The epoch whose state the run folder holds: the best validated, else the last."""
        return self.epochs_done if self.best_epoch is None else self.best_epoch

    @property
    def validation_draws(self) -> int | None:
        """The noise draws each epoch was validated under (None: nothing validated yet)."""
        levels = self.validation[0].get("consistency") if self.validation else None
        return len(levels) if levels else None

    def to_json(self) -> dict[str, Any]:
        """The keys frontend.json has always had, and the version."""
        extra: dict[str, Any] = {
            "mse_pretrain_loss": self.mse_pretrain_loss,
            "start": None if self.start is None else vars(self.start).copy(),
            "scored": self.scored,
            "best_epoch": self.best_epoch,
            "confirmation": self.confirmation,
            "head_stage_from": self.head_stage_from,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "note": self.note,
        }
        return {
            "record_version": RECORD_VERSION,
            "queries": self.queries,
            "epochs_done": self.epochs_done,
            "validation": self.validation,
            "extra": {k: v for k, v in extra.items() if v is not None},
        }


def migrate(data: dict[str, Any], where: str = "frontend.json") -> TrainingRecord:
    """frontend.json (any version: today's, or the `extra` layout of 0.1.0 and before) → the
    current `TrainingRecord`, every value checked. What older runs lack is filled in here:
    a run without a kept epoch keeps its last one, a confirmation without the start's wrong
    answers forgets the start's tally (it is asked again)."""
    version = 1  # no version key: the `extra` layout of 0.1.0 and before
    if "record_version" in data:
        version = want_int(data, "record_version", where, 1, RECORD_VERSION)
    for key in ("queries", "epochs_done"):
        if key in data:
            want_int(data, key, where, 0, None)
    rows = data.get("validation", [])
    if not isinstance(rows, list):
        raise UsageError(f"{where}: 'validation' must be a list, not {shown(rows)}")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise UsageError(f"{where}: 'extra' must be an object, not {shown(extra)}")
    epochs = [_check_row(row, f"{where}: validation row {i + 1}") for i, row in enumerate(rows)]
    record = TrainingRecord(
        version=version,
        queries=data.get("queries", 0),
        epochs_done=data.get("epochs_done", 0),
        validation=list(rows),
        **_check_extra(extra, f"{where}: extra"),
    )
    if record.best_epoch is None and rows:  # version 1 before kept epochs: the last one
        record.best_epoch = record.epochs_done
    if epochs and record.kept_epoch not in epochs:
        raise UsageError(
            f"{where}: extra 'best_epoch' {record.kept_epoch} is not among its validated "
            "epochs; train again or restore it"
        )
    return record


def _check_row(row: Any, at: str) -> int:
    """A validation row that resuming and printing a run compute with; its epoch."""
    if not isinstance(row, dict) or "epoch" not in row or "noisy_accuracy" not in row:
        raise UsageError(f"{at} must be an object with 'epoch' and 'noisy_accuracy'")
    epoch = want_int(row, "epoch", at, 0, None)
    if not 0 <= want_float(row, "noisy_accuracy", at, allow_zero=True) <= 1:
        raise UsageError(f"{at}: 'noisy_accuracy' must lie in [0, 1]")
    for key, length in (("interval", 2), ("vs_start", 3), ("consistency", None)):
        if key not in row:
            continue
        value = row[key]
        numbers = isinstance(value, list) and all(
            (is_int(v) or isinstance(v, float)) for v in value
        )
        if not numbers or not value or (length is not None and len(value) != length):
            raise UsageError(f"{at}: {key!r} must be a list of numbers, not {shown(value)}")
    if "queries" in row:
        want_int(row, "queries", at, 0, None)
    for key in ("confirmed", "confirmed_wrong"):
        if key in row:
            _want_counts(row[key], f"{at}: {key!r}")
    return epoch


def _check_extra(extra: dict[str, Any], where: str) -> dict[str, Any]:
    """The record's fields kept under `extra`, checked; unknown keys are left out."""
    fields: dict[str, Any] = {}
    for key in ("best_epoch", "head_stage_from", "stopped_early"):
        if key in extra:
            fields[key] = want_int(extra, key, where, 0, None)
    if "scored" in extra:
        if not isinstance(extra["scored"], bool):
            raise UsageError(
                f"{where} 'scored' must be true or false, not {shown(extra['scored'])}"
            )
        fields["scored"] = extra["scored"]
    for key in ("mse_pretrain_loss", "seconds"):
        if extra.get(key) is not None:
            fields[key] = want_float(extra, key, where, allow_zero=True)
    if extra.get("note") is not None:
        fields["note"] = want_str(extra, "note", where, limit=1000)
    if extra.get("start") is not None:
        start = extra["start"]
        at = f"{where} 'start'"
        if not isinstance(start, dict) or {"weights", "method"} - start.keys():
            raise UsageError(f"{at} must be an object with method and weights")
        fields["start"] = StartRecord(
            want_str(start, "weights", at, limit=200) or "",
            want_str(start, "method", at, limit=200) or "",
        )
    if extra.get("confirmation") is not None:
        fields["confirmation"] = _check_confirmation(
            extra["confirmation"], f"{where} 'confirmation'"
        )
    return fields


def _check_confirmation(confirmation: Any, at: str) -> dict[str, Any]:
    keys = {"draws", "images", "active", "start", "queries"}
    if not isinstance(confirmation, dict) or keys - confirmation.keys():
        raise UsageError(f"{at} must be an object with {', '.join(sorted(keys))}")
    for key in ("draws", "images", "queries"):
        want_int(confirmation, key, at, 0, None)
    if not isinstance(confirmation["active"], bool):
        raise UsageError(f"{at}: 'active' must be true or false")
    out = {k: confirmation[k] for k in ("draws", "images", "active", "start", "queries")}
    out["start_wrong"] = confirmation.get("start_wrong")
    if out["start"] is not None:
        _want_counts(out["start"], f"{at}: 'start'", out["images"])
    if out["start"] is not None and out["start_wrong"] is not None:
        most = out["images"] * out["draws"]
        _want_counts(out["start_wrong"], f"{at}: 'start_wrong'", most, "answers")
        if len(out["start_wrong"]) != len(out["start"]):
            raise UsageError(f"{at}: 'start_wrong' must have one count per level of 'start'")
    if out["start"] is None or out["start_wrong"] is None:  # older runs: the start asked again
        out["start"] = out["start_wrong"] = None
    return {k: out[k] for k in ("draws", "images", "active", "start", "start_wrong", "queries")}


def _want_counts(value: Any, where: str, high: int | None = None, of: str = "images") -> None:
    """Confirmation counts: a list of integers, one per level."""
    if not isinstance(value, list) or not all(is_int(v) and v >= 0 for v in value):
        raise UsageError(f"{where} must be a list of counts, not {shown(value)}")
    if high is not None and any(v > high for v in value):
        raise UsageError(f"{where} counts more than its {high} {of}")
