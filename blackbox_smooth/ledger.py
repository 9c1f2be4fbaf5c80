"""The evidence ledger: every look at an image's votes under a model, so that "fresh" holds.

A certificate's (1 − α) guarantee holds for a protocol decided before its samples are seen.
Looking first (a `predict`, a certificate that fell short, another seed "until it certifies")
and then choosing the protocol breaks it: choosing n after reading `predict`'s counts gives
about 5 × α wrong certificates. So every run that reveals votes records its look here before it
draws a sample, and a run cut short (Ctrl-C, the budget, an error) stays recorded.

What makes two looks the same question is the image's content, the model and σ: the model is
the black box by what it is (a file model by its content digest and function, wherever and
however the file is named; a remote one by its endpoint identity) and the front end by its
weights; σ within a relative 1e-6 is the same σ. Seeds, n, α, targets and the command are the
attempt. The first attempt is fresh. Replaying an attempt exactly (a resume, a reproduction:
the same stream and protocol) gives the same certificate and keeps its standing. Any other
attempt is reported with `fresh: false`, its place among the attempts (`looks`), and the α its
claim holds at under a union bound over them (`alpha_effective`: the sum over the attempts of
each one's α, counted at no less than this one's, since a look that is not a certificate, such
as `predict`, has no α of its own to spend).

The ledger is one SQLite file in the user's data folder ($BBSMOOTH_LEDGER moves it), kept
whatever `--cache` or `--no-cache` say; `cache clear` never touches it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from .digests import fingerprint
from .errors import UsageError
from .sqlitefile import SQLiteFile

ENV = "BBSMOOTH_LEDGER"
DATABASE = "ledger.db"
SIGMA_RTOL = 1e-6  # σ this close is the same question (the noise drawn is the same)
MAX_ROWS = 10_000  # looks read per image and model: bounded whatever the file holds


def default_dir() -> Path:
    return Path(os.environ.get(ENV) or platformdirs.user_data_dir("bbsmooth"))


def model_identity(description: dict[str, Any], frontend: str | None) -> str:
    """The smoothed model's identity, independent of how its files are named: a local model's
    path gives way to its content digests (only the function's name is kept); a remote one is
    its endpoint identity (the URL without secrets, or --endpoint-id)."""
    what = dict(description)
    target = what.pop("target", None)
    digested = any(k.endswith("sha256") for k in what)
    if target is not None and not digested:
        what["target"] = target  # nothing better to know it by
    elif target is not None and what.get("protocol") in ("python", "torch-module"):
        what["function"] = str(target).rsplit(":", 1)[-1]  # FILE.py:FUNC or module:FUNC
    return fingerprint({"blackbox": what, "frontend": frontend})


@dataclass(frozen=True)
class Attempt:
    """What a run decided before looking: the command, the noise stream (seed, generator,
    device) and the protocol (n0, n or its cap, α, target, bound)."""

    command: str  # certify | predict
    stream: dict[str, Any]
    protocol: dict[str, Any]
    alpha: float

    @property
    def signature(self) -> str:
        return json.dumps([self.command, self.stream, self.protocol], sort_keys=True, default=str)


@dataclass(frozen=True)
class Standing:
    """An attempt's place in its image's history: fresh when it is the first."""

    fresh: bool
    looks: int  # attempts on this image and model up to and including this one
    alpha_effective: float  # α under a union bound over those attempts
    earlier: str | None  # the first attempt, in words, when this one is not it
    row: int  # the ledger row, for `finish`
    said: bool = False  # the row already holds what its attempt said (a replay)


class Ledger:
    """The looks recorded on this machine (SQLite: safe to share between processes)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error(e) from None
        self._file = SQLiteFile(self.directory / DATABASE, self._error)
        with self._file.writing() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS looks (id INTEGER PRIMARY KEY AUTOINCREMENT, model "
                "TEXT NOT NULL, image TEXT NOT NULL, sigma REAL NOT NULL, attempt TEXT NOT NULL, "
                "alpha REAL NOT NULL, said TEXT, at REAL NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS by_image ON looks (model, image)")

    def _error(self, e: BaseException) -> UsageError:
        text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        return UsageError(
            f"cannot use the evidence ledger in {self.directory} ({text}): make it writable, "
            f"move what is not ours aside, or set ${ENV} to a folder you can write"
        )

    def begin(self, model: str, image: str, sigma: float, attempt: Attempt) -> Standing:
        """Record `attempt` on (model, image, σ) before it looks, unless it is a replay of one
        recorded; return its standing."""
        signature = attempt.signature
        with self._file.reading() as db:  # a replay is found without taking the write lock
            rows = self._looks(db, model, image, sigma)
        place = next((i for i, r in enumerate(rows) if r[2] == signature), None)
        if place is None:
            with self._file.writing() as db:  # looked at again inside the transaction
                rows = self._looks(db, model, image, sigma)
                place = next((i for i, r in enumerate(rows) if r[2] == signature), None)
                if place is None:
                    cursor = db.execute(
                        "INSERT INTO looks (model, image, sigma, attempt, alpha, at) VALUES "
                        "(?, ?, ?, ?, ?, ?)",
                        (model, image, sigma, signature, attempt.alpha, time.time()),
                    )
                    rows.append((cursor.lastrowid, sigma, signature, attempt.alpha, None))
                    place = len(rows) - 1
        upto = rows[: place + 1]
        spent = sum(max(_number(r[3]), attempt.alpha) for r in upto[:-1]) + attempt.alpha
        return Standing(
            fresh=place == 0,
            looks=place + 1,
            alpha_effective=min(1.0, spent),
            earlier=None if place == 0 else describe(rows[0][2], rows[0][4]),
            row=int(upto[-1][0]),
            said=upto[-1][4] is not None,
        )

    @staticmethod
    def _looks(db: sqlite3.Connection, model: str, image: str, sigma: float) -> list[Any]:
        """The looks at (model, image) with this σ, in the order they were first made."""
        rows = db.execute(
            "SELECT id, sigma, attempt, alpha, said FROM looks WHERE model = ? AND image = ? "
            "ORDER BY id LIMIT ?",
            (model, image, MAX_ROWS),
        ).fetchall()
        return [r for r in rows if _same_sigma(r[1], sigma)]

    def finish(self, standing: Standing, said: dict[str, Any]) -> None:
        """What the attempt said, for the words of later attempts (the first one to finish)."""
        if standing.said:
            return  # a replay: its words are there
        with self._file.writing() as db:
            db.execute(
                "UPDATE looks SET said = ? WHERE id = ? AND said IS NULL",
                (json.dumps(said, sort_keys=True), standing.row),
            )

    def count(self) -> int:
        with self._file.writing() as db:
            return int(db.execute("SELECT count(*) FROM looks").fetchone()[0])

    def close(self) -> None:
        self._file.close()


def _same_sigma(stored: object, sigma: float) -> bool:
    return math.isclose(_number(stored), sigma, rel_tol=SIGMA_RTOL)


def _number(value: object) -> float:
    """A float from the file (a row that holds none counts as the worst case)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1.0
    return number if math.isfinite(number) else 1.0


def describe(signature: str, said: str | None) -> str:
    """An earlier attempt in words: its command, protocol, seed and what it said."""
    try:
        command, stream, p = json.loads(signature)
        result = json.loads(said) if said else None
    except (ValueError, TypeError):
        return "an earlier look (unreadable)"
    if not isinstance(p, dict) or not isinstance(stream, dict):
        return "an earlier look (unreadable)"
    if command == "predict":
        how = f"predict n={p.get('n')}"
    else:
        modes = {
            "fixed": f"fixed n={p.get('n')}",
            "target": f"--target-radius {p.get('target_radius')}",
            "budget": f"--budget {(p.get('n_max') or 0) + (p.get('n0') or 0)}",
        }
        how = modes.get(str(p.get("mode")), str(p.get("mode")))
        how += f", n0={p.get('n0')}"
    how += f", α={p.get('alpha')}, seed {stream.get('seed')}"
    if not isinstance(result, dict):
        return f"{how}: stopped before it finished"
    label = result.get("label", -1)
    if label == -1:
        return f"{how}: abstained"
    radius = result.get("radius")
    at = f" at radius {radius:.3f}" if isinstance(radius, (int, float)) else ""
    return f"{how}: label {label}{at}"
