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

import numpy as np

from ..blackbox import MAX_CLASSES, OTHER, Answer, Pairs
from ..errors import UsageError
from ..inputs import MAX_CONFIG_BYTES, decode_text, parse_json, read_bytes, shown
from ..redaction import server_text

# A class index as a server may write it; more than 12 digits is never below MAX_CLASSES.
_INDEX = re.compile(r"(?:LABEL_)?0*([0-9]{1,12})", re.IGNORECASE | re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


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
        data = read_bytes(path, "--labels", MAX_CONFIG_BYTES, "a JSON or CSV file")
        if path.lower().endswith(".json"):
            pairs = _parse_json(data, path)
        else:
            pairs = _parse_csv(decode_text(data, path, "--labels"), path)
        return cls.from_pairs(pairs, path)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str | int]], source: str) -> LabelMap:
        if not pairs:
            raise UsageError(f"label map {source} is empty: list 'vendor label,class' rows")
        values = [v for _, v in pairs]
        as_index = all(
            isinstance(v, int) or _DIGITS.fullmatch(str(v).strip()) is not None for v in values
        )
        if as_index:  # bounded before anything is numbered: never range() of a huge class
            index = {v: _class_index(v, source) for v in values}
            classes = tuple(str(i) for i in range(max(index.values()) + 1))
        else:
            names = sorted({str(v).strip() for v in values})
            if "" in names:
                raise UsageError(f"label map {source} has a row with an empty class")
            if len(names) > MAX_CLASSES:
                raise UsageError(
                    f"label map {source} names {len(names):,} classes, more than "
                    f"{MAX_CLASSES:,}: is it the right file?"
                )
            classes = tuple(names)
            position = {name: i for i, name in enumerate(names)}
            index = {v: position[str(v).strip()] for v in values}
        table: dict[str, int] = {}
        for label, value in pairs:
            key = normalize(label)
            if not key:
                raise UsageError(f"label map {source} has a row with an empty vendor label")
            if key in table and table[key] != index[value]:
                raise UsageError(
                    f"label map {source} maps {shown(label)} to two classes "
                    f"({shown(classes[table[key]])} and {shown(classes[index[value]])}): keep one"
                )
            table[key] = index[value]
        return cls(table, classes, source)

    def lookup(self, label: str | int) -> int | None:
        if not self.table:  # identity: the label must be a class index
            if isinstance(label, int):
                return label if 0 <= label < MAX_CLASSES else None
            m = _INDEX.fullmatch(str(label).strip())
            index = int(m.group(1)) if m else MAX_CLASSES
            return index if index < MAX_CLASSES else None  # too large: not a class, OTHER
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
                    f"{what} answers label names such as '{server_text(seen, 60)}': give "
                    "--labels FILE mapping "
                    "them to your classes (`bbsmooth labels IMAGE --endpoint …` lists them)"
                )
        scores = None
        if self.classes:  # per class, the best score of a label mapped to it
            best = np.zeros((len(answers), len(self.classes)), dtype=np.float64)
            for i, pairs in enumerate(answers):
                for label, score in pairs:
                    cls = self.lookup(label)
                    if cls is not None:
                        best[i, cls] = max(best[i, cls], score)
            # a finite float64 past float32's range (a hostile 3.5e38) must not become inf
            limit = float(np.finfo(np.float32).max)
            scores = np.clip(best, -limit, limit).astype(np.float32)
        return Answer(labels, scores)


def _class_index(value: str | int, source: str) -> int:
    """A class given as an index: 0..MAX_CLASSES-1, or one line saying why not."""
    text = str(value).strip()
    number = int(text) if len(text) <= 12 else MAX_CLASSES  # int() of 5,000 digits raises
    if not 0 <= number < MAX_CLASSES:
        raise UsageError(
            f"label map {source} has class {text[:20]}{'…' if len(text) > 20 else ''}: "
            "class indices must be "
            f"0..{MAX_CLASSES - 1:,} (number your classes from 0, or name them)"
        )
    return number


def _parse_json(data: bytes, path: str) -> list[tuple[str, str | int]]:
    parsed = parse_json(data, f"--labels {path}")
    if not isinstance(parsed, dict):
        raise UsageError(f'--labels {path} must be a JSON object {{"vendor label": class, …}}')
    pairs: list[tuple[str, str | int]] = []
    for label, value in parsed.items():
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise UsageError(f"--labels {path}: {shown(label)} maps to {shown(value)}, not a class")
        pairs.append((label, value))
    return pairs


def _parse_csv(text: str, path: str = "") -> list[tuple[str, str | int]]:
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    except csv.Error as e:  # a field over csv's 131,072-character limit, a stray NUL, …
        raise UsageError(
            f"--labels {path} is not a readable CSV ({e}): write 'vendor label,class' rows"
        ) from None
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
