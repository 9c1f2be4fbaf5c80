"""The evidence ledger: every look at an image's votes under a model, so that "fresh" holds.

A certificate's (1 − α) guarantee holds for a protocol decided before its samples are seen.
Looking first (a `predict`, a certificate that fell short, another seed "until it certifies")
and then choosing the protocol breaks it: choosing n after reading `predict`'s counts makes
wrong certificates at a rate above α (tests/test_ledger_coverage.py). So every run that
reveals votes records its look here before it draws a sample, and a run cut short (Ctrl-C, the
budget, an error) stays recorded.

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
from dataclasses import dataclass, field, replace
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
    """An attempt's place in its image's history: fresh when it is the only one."""

    fresh: bool
    looks: int  # attempts recorded on this image and model (this one included)
    alpha_effective: float  # α under a union bound over them; 1 when samples were reused
    earlier: str | None  # the first other attempt, in words, when this one is not alone
    row: int  # the ledger row, for `finish`
    said: str | None = None  # what the row's attempt said before (a replay), as stored
    where: tuple[str, str, float, Attempt] | None = field(default=None, repr=False)


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
        recorded; return its standing among all the attempts recorded there."""
        signature = attempt.signature
        with self._file.reading() as db:  # a replay is found without taking the write lock
            rows = self._looks(db, model, image, sigma)
        row = next((r for r in rows if r[2] == signature), None)
        if row is None:
            with self._file.writing() as db:  # looked at again inside the transaction
                rows = self._looks(db, model, image, sigma)
                row = next((r for r in rows if r[2] == signature), None)
                if row is None and len(rows) < MAX_ROWS:
                    cursor = db.execute(
                        "INSERT INTO looks (model, image, sigma, attempt, alpha, at) VALUES "
                        "(?, ?, ?, ?, ?, ?)",
                        (model, image, sigma, signature, attempt.alpha, time.time()),
                    )
                    row = (cursor.lastrowid, sigma, signature, attempt.alpha, None)
                    rows.append(row)
        if row is None:  # more looks than are read back: fail closed, no claim
            return Standing(False, len(rows) + 1, 1.0, "too many earlier looks to count", -1)
        others = [r for r in rows if r[0] != row[0]]
        return Standing(
            fresh=not others,
            looks=len(rows),
            alpha_effective=_union(attempt, others),
            earlier=describe(others[0][2], others[0][4]) if others else None,
            row=int(row[0] or -1),
            said=row[4],
            where=(model, image, sigma, attempt),
        )

    @staticmethod
    def _looks(db: sqlite3.Connection, model: str, image: str, sigma: float) -> list[Any]:
        """The looks at (model, image) with this σ, in the order they were first made."""
        low, high = sigma * (1 - SIGMA_RTOL), sigma * (1 + SIGMA_RTOL)
        return db.execute(
            "SELECT id, sigma, attempt, alpha, said FROM looks WHERE model = ? AND image = ? "
            "AND sigma BETWEEN ? AND ? ORDER BY id LIMIT ?",
            (model, image, low, high, MAX_ROWS),
        ).fetchall()

    def finish(self, standing: Standing, said: dict[str, Any]) -> Standing:
        """Record what the attempt said; its standing. A replay whose votes differ from what
        its attempt said before (a model that changed, or answers at random, without a cache)
        is not the same evidence: it is recorded as one more look."""
        if standing.row < 0 or standing.where is None:
            return standing
        if standing.said is not None:
            try:
                before = json.loads(standing.said).get("votes")
            except (ValueError, AttributeError):
                before = None
            if before == said.get("votes"):
                return standing  # the same evidence again
            model, image, sigma, attempt = standing.where
            again = replace(attempt, protocol={**attempt.protocol, "votes": said.get("votes")})
            return self.finish(self.begin(model, image, sigma, again), said)
        with self._file.writing() as db:
            db.execute(
                "UPDATE looks SET said = ? WHERE id = ? AND said IS NULL",
                (json.dumps(said, sort_keys=True), standing.row),
            )
        return standing

    def count(self) -> int:
        with self._file.writing() as db:
            return int(db.execute("SELECT count(*) FROM looks").fetchone()[0])

    def close(self) -> None:
        self._file.close()


def _union(attempt: Attempt, others: list[Any]) -> float:
    """α of `attempt` under a union bound over the other attempts, each counted at no less
    than its α; 1 (no claim) when one of them looked at the same noise stream, whose votes
    this attempt then reuses: its n could have been chosen from them."""
    stream = json.dumps(attempt.stream, sort_keys=True)
    for r in others:
        try:
            theirs = json.dumps(json.loads(r[2])[1], sort_keys=True)
        except (ValueError, TypeError, IndexError):
            return 1.0  # unreadable: assume the worst
        if theirs == stream:
            return 1.0
    spent = sum(max(_number(r[3]), attempt.alpha) for r in others) + attempt.alpha
    return min(1.0, spent)


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
