"""The disk cache of answered noise blocks.

Every entry is the black box's answer to the first k samples of one noise block, stored as our
own checksummed binary record (never a pickle). A damaged entry is dropped and asked again, never
trusted. Keys are sha256 digests of everything that changes the distribution of answers (the
black box's fingerprint, the front end's weights, σ, the seed, the image, the noise generator,
the region and block): two keys are equal only when the answers are interchangeable. They never
hold a secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import platformdirs

from .blackbox import MAX_CLASSES, Answer
from .errors import UsageError

MAGIC = b"BBS1"  # an answered block
RECORD = b"BBSR"  # a JSON record (the evidence ledger)
DATABASE = "cache.db"  # diskcache's SQLite file
# What a cache that cannot be used raises: SQLite's errors, the file system's, a lock timeout.
CACHE_ERRORS = (sqlite3.Error, OSError, diskcache.Timeout)


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
        if n < 0 or (k is not None and not 0 < int(k) <= MAX_CLASSES):
            return None
        labels = np.frombuffer(body, np.int32, n, offset).astype(np.int64)
        if n and (labels.min() < -1 or labels.max() >= MAX_CLASSES):
            return None  # not an answer we wrote: ask again
        offset += 4 * n
        scores = None
        if k is not None:
            scores = np.frombuffer(body, np.float32, n * int(k), offset).reshape(n, int(k)).copy()
        return Answer(labels, scores)
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def check_folder(directory: Path) -> None:
    """A file where the cache folder should be is one line, whether we open it or only look."""
    if directory.exists() and not directory.is_dir():
        raise UsageError(
            f"the cache folder {directory} is a file, not a folder: give another --cache DIR "
            "(or --no-cache)"
        )


class BlockCache:
    """Answered blocks on disk, safe to share between processes (SQLite underneath).

    A cache that cannot be used (a file where the folder should be, a read-only folder or
    database, a damaged cache.db, a full disk) is one UsageError line naming the folder and what
    to do, at open time when it shows then, else at the first read or write. A damaged cache is
    never deleted or recreated: the answers in it were paid for."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        check_folder(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error(e) from None
        db = self.directory / DATABASE
        try:
            regular = stat.S_ISREG(os.stat(db).st_mode) if os.path.lexists(db) else True
        except OSError as e:
            raise self._error(e) from None
        if not regular:  # SQLite would wait forever on a FIFO
            raise UsageError(
                f"the cache {db} is not a regular file: move it aside, or give another "
                "--cache DIR (or --no-cache)"
            )
        try:
            # Answers cost money: never evict them to make room.
            self._store = diskcache.Cache(
                str(self.directory), eviction_policy="none", size_limit=2**62
            )
        except CACHE_ERRORS as e:
            raise self._error(e) from None

    def _error(self, e: BaseException) -> UsageError:
        """One line for a cache that cannot be used: what happened, where, what to do."""
        text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        where, also = self.directory, "give another --cache DIR (or --no-cache)"
        lowered = text.lower()
        if isinstance(e, diskcache.Timeout) or "locked" in lowered or "busy" in lowered:
            return UsageError(f"the cache {where} is locked by another process ({text}): {also}")
        if "full" in lowered or "no space" in lowered or "quota" in lowered:
            return UsageError(f"the cache {where} cannot grow ({text}): free disk space, or {also}")
        if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
            return UsageError(
                f"the cache {where} is damaged ({text}): move {where / DATABASE} aside (bbsmooth "
                f"leaves it as it is), or {also}"
            )
        return UsageError(f"cannot use the cache {where} ({text}): make it writable, or {also}")

    def get(self, key: str) -> Answer | None:
        try:
            blob = self._store.get(key)
            if blob is None:
                return None
            answer = decode(blob)
            if answer is None:
                self._store.delete(key)
        except CACHE_ERRORS as e:
            raise self._error(e) from None
        return answer

    def put_many(self, items: list[tuple[str, Answer]], delete: Sequence[str] = ()) -> None:
        """Store `items` and drop the `delete` keys, all in one SQLite transaction."""
        try:
            with self._store.transact():
                for key, answer in items:
                    self._store.set(key, encode(answer))
                for key in delete:
                    self._store.delete(key)
        except CACHE_ERRORS as e:
            raise self._error(e) from None

    def get_record(self, key: str) -> Any:
        """A small JSON record stored with `put_record` (the evidence ledger), or None when
        there is none or it is damaged (never trusted)."""
        try:
            blob = self._store.get(key)
        except CACHE_ERRORS as e:
            raise self._error(e) from None
        if not isinstance(blob, bytes) or blob[:4] != RECORD or len(blob) < 36:
            return None
        if hashlib.sha256(blob[36:]).digest() != blob[4:36]:
            return None
        try:
            return json.loads(blob[36:])
        except ValueError:
            return None

    def put_record(self, key: str, value: Any) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        try:
            self._store.set(key, RECORD + hashlib.sha256(body).digest() + body)
        except CACHE_ERRORS as e:
            raise self._error(e) from None

    def close(self) -> None:
        try:
            self._store.close()
        except CACHE_ERRORS as e:
            raise self._error(e) from None

    def contents(self, drop_answers: bool = False) -> tuple[int, int, int]:
        """(answered blocks, the queries they hold, ledger records); with `drop_answers`, the
        answered blocks (and damaged entries) are deleted as they are counted. The ledger stays:
        it remembers which noise samples certificates have used, and forgetting that would let
        a certificate chosen after looking pass as fresh."""
        blocks = queries = records = 0
        doomed: list[str] = []
        try:
            for key in list(self._store.iterkeys()):
                blob = self._store.get(key)
                if isinstance(blob, bytes) and blob[:4] == RECORD:
                    records += 1
                    continue
                answer = decode(blob)
                if answer is not None:
                    blocks += 1
                    queries += len(answer.labels)
                if drop_answers:
                    doomed.append(key)
            for start in range(0, len(doomed), 1000):
                with self._store.transact():
                    for key in doomed[start : start + 1000]:
                        self._store.delete(key)
        except CACHE_ERRORS as e:
            raise self._error(e) from None
        return blocks, queries, records


def disk_bytes(directory: Path) -> int:
    """Bytes the cache takes on disk: its database and the files diskcache keeps beside it."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def is_cache(directory: Path) -> bool:
    """Whether `directory` holds a cache (bbsmooth never opens, so never creates, one to look)."""
    return (directory / DATABASE).is_file()


def compact(directory: Path) -> None:
    """Give the space of deleted entries back to the file system (SQLite keeps it otherwise)."""
    try:
        with contextlib.closing(sqlite3.connect(directory / DATABASE, timeout=60)) as db:
            db.execute("VACUUM")
    except sqlite3.Error as e:
        raise UsageError(f"cleared the cache {directory}, but could not compact it ({e})") from e
