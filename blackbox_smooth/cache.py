"""The disk cache of answered noise blocks.

Every entry is the black box's answer to the first k samples of one noise block, stored as our
own checksummed binary record (never a pickle). A damaged entry is dropped and asked again, never
trusted. Keys are sha256 digests of everything that changes the distribution of answers
(DESIGN.md rule 7); they never hold a secret.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import platformdirs

from .adapters.base import Answer
from .errors import UsageError

MAGIC = b"BBS1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("BBSMOOTH_CACHE") or platformdirs.user_cache_dir("bbsmooth"))


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode(answer: Answer) -> bytes:
    labels = np.ascontiguousarray(answer.labels, dtype=np.int32)
    scores = None if answer.scores is None else np.ascontiguousarray(answer.scores, np.float32)
    header = json.dumps(
        {"n": int(labels.shape[0]), "k": None if scores is None else int(scores.shape[1])}
    ).encode()
    body = struct.pack("<I", len(header)) + header + labels.tobytes()
    if scores is not None:
        body += scores.tobytes()
    return MAGIC + hashlib.sha256(body).digest() + body


def decode(blob: bytes) -> Answer | None:
    """The stored answer, or None when the record is damaged."""
    if not isinstance(blob, bytes) or len(blob) < 40 or blob[:4] != MAGIC:
        return None
    digest, body = blob[4:36], blob[36:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        (size,) = struct.unpack_from("<I", body)
        header = json.loads(body[4 : 4 + size])
        n, k = int(header["n"]), header["k"]
        offset = 4 + size
        labels = np.frombuffer(body, np.int32, n, offset).astype(np.int64)
        offset += 4 * n
        scores = None
        if k is not None:
            scores = np.frombuffer(body, np.float32, n * int(k), offset).reshape(n, int(k)).copy()
        return Answer(labels, scores)
    except (ValueError, KeyError, TypeError, struct.error):
        return None


class BlockCache:
    """Answered blocks on disk, safe to share between processes (SQLite underneath)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Answers cost money: never evict them to make room.
            self._store = diskcache.Cache(
                str(self.directory), eviction_policy="none", size_limit=2**62
            )
        except OSError as e:
            raise UsageError(f"cannot use cache directory {self.directory}: {e.strerror}") from e

    def get(self, key: str) -> Answer | None:
        blob = self._store.get(key)
        if blob is None:
            return None
        answer = decode(blob)
        if answer is None:
            self._store.delete(key)
        return answer

    def put(self, key: str, answer: Answer) -> None:
        self._store.set(key, encode(answer))

    def put_many(self, items: list[tuple[str, Answer]], delete: Sequence[str] = ()) -> None:
        """Store `items` and drop the `delete` keys, all in one SQLite transaction."""
        with self._store.transact():
            for key, answer in items:
                self._store.set(key, encode(answer))
            for key in delete:
                self._store.delete(key)

    def close(self) -> None:
        self._store.close()
