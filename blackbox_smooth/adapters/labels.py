"""Label maps: a vendor's label strings → the task's classes.

Vendor APIs answer with their own vocabulary ("Tabby cat", "Felidae", …) and often several
labels per image. A label map (`--labels FILE`, JSON or CSV) names, for each vendor label, the
class it stands for; several vendor labels may stand for one class, and matching ignores case
and repeated whitespace. For one image the top-scoring mapped label wins; an image whose labels
all map to nothing votes OTHER, a vote against the top class and never for it.

Without a map, labels must already be class indices ("3", 3, or transformers' "LABEL_3").
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .base import OTHER, Answer

Pairs = Sequence[tuple[str, float]]  # one image's (label, score) answers, in any order

_INDEX = re.compile(r"(?:LABEL_)?(\d+)", re.IGNORECASE)


def normalize(label: str) -> str:
    return " ".join(str(label).split()).casefold()


@dataclass(frozen=True)
class LabelMap:
    """`table`: normalized vendor label → class index; `classes`: class names by index."""

    table: dict[str, int]
    classes: tuple[str, ...]
    source: str = "identity"

    @property
    def digest(self) -> str:
        """What the map does, for the black box's fingerprint (not where the file lies)."""
        blob = json.dumps([sorted(self.table.items()), list(self.classes)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def identity(cls) -> LabelMap:
        return cls({}, ())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LabelMap:
        """JSON `{"vendor label": class, …}` or CSV rows `vendor label,class` (a header row
        `label,class` is allowed). A class is an index (an integer) or a name; names are
        numbered in sorted order, as `--data` numbers its sorted sub-folders."""
        path = os.fspath(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise UsageError(f"--labels {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--labels {path} could not be read as text: {e}") from e
        pairs = _parse_json(text, path) if path.lower().endswith(".json") else _parse_csv(text)
        return cls.from_pairs(pairs, path)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str | int]], source: str) -> LabelMap:
        if not pairs:
            raise UsageError(f"label map {source} is empty: list 'vendor label,class' rows")
        values = [v for _, v in pairs]
        as_index = all(isinstance(v, int) or str(v).strip().isdigit() for v in values)
        if as_index:
            index = {v: int(v) for v in values}
            classes = tuple(str(i) for i in range(max(index.values()) + 1))
        else:
            names = sorted({str(v).strip() for v in values})
            if "" in names:
                raise UsageError(f"label map {source} has a row with an empty class")
            classes = tuple(names)
            index = {v: names.index(str(v).strip()) for v in values}
        table: dict[str, int] = {}
        for label, value in pairs:
            key = normalize(label)
            if not key:
                raise UsageError(f"label map {source} has a row with an empty vendor label")
            if key in table and table[key] != index[value]:
                raise UsageError(
                    f"label map {source} maps {label!r} to two classes "
                    f"({classes[table[key]]!r} and {classes[index[value]]!r}): keep one"
                )
            table[key] = index[value]
        return cls(table, classes, source)

    def lookup(self, label: str | int) -> int | None:
        if not self.table:  # identity: the label must be a class index
            if isinstance(label, int):
                return label if label >= 0 else None
            m = _INDEX.fullmatch(str(label).strip())
            return int(m.group(1)) if m else None
        return self.table.get(normalize(str(label)))

    def resolve(self, pairs: Pairs) -> int:
        """The class of the top-scoring label that maps to one, else OTHER."""
        best, best_score = OTHER, -np.inf
        for label, score in pairs:
            cls = self.lookup(label)
            if cls is not None and score > best_score:
                best, best_score = cls, score
        return best

    def answer(self, answers: Sequence[Pairs], what: str) -> Answer:
        """One `Answer` for a batch of per-image (label, score) lists."""
        labels = np.array([self.resolve(p) for p in answers], dtype=np.int64)
        if not self.table and len(answers) and np.all(labels == OTHER):
            seen = next((p[0][0] for p in answers if p), None)
            if seen is not None:
                raise UsageError(
                    f"{what} answers label names such as {seen!r}: give --labels FILE mapping "
                    "them to your classes (`bbsmooth labels IMAGE --endpoint …` lists them)"
                )
        scores = None
        if self.classes:  # per class, the best score of a label mapped to it
            scores = np.zeros((len(answers), len(self.classes)), dtype=np.float32)
            for i, pairs in enumerate(answers):
                for label, score in pairs:
                    cls = self.lookup(label)
                    if cls is not None:
                        scores[i, cls] = max(scores[i, cls], score)
        return Answer(labels, scores)


def _parse_json(text: str, path: str) -> list[tuple[str, str | int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--labels {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise UsageError(f'--labels {path} must be a JSON object {{"vendor label": class, …}}')
    pairs: list[tuple[str, str | int]] = []
    for label, value in data.items():
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise UsageError(f"--labels {path}: {label!r} maps to {value!r}, not a class")
        pairs.append((label, value))
    return pairs


def _parse_csv(text: str) -> list[tuple[str, str | int]]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and [c.strip().casefold() for c in rows[0]] in (
        ["label", "class"],
        ["vendor", "class"],
    ):
        rows = rows[1:]
    pairs: list[tuple[str, str | int]] = []
    for number, row in enumerate(rows, 1):
        if len(row) != 2:
            raise UsageError(
                f"label map row {number} has {len(row)} columns: write 'vendor label,class'"
            )
        pairs.append((row[0], row[1].strip()))
    return pairs
