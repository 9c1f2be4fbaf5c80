"""The disk cache of answered noise blocks: one SQLite file that reads only what it wrote.

Every entry is the black box's answer to the first k samples of one noise block (or a small
JSON record: the journal of `evaluate --ray`), stored inline in one SQLite table as our own
binary record: a magic, a digest of the entry's key and body, the body. Nothing is unpickled,
no entry names a file, nothing outside the database is opened, followed or deleted, a schema
we did not make is refused, and no statement runs past a deadline: an entry that fails its
check, or is larger than any we write, is asked again. Rows in any other table (an older
bbsmooth's diskcache rows) are foreign: counted, never read. A digest catches damage, not
forgery: whoever can write the folder can write answers that pass it, unless the cache is
sealed with a key (below).

With `$BBSMOOTH_CACHE_KEY` set, entries carry an HMAC-SHA256 under that key instead of a plain
digest, and only entries that verify under it are used: a cache shared by several people is
then authenticated by a key kept outside it. The digest covers the entry's key too, so an entry
copied under another key fails.

Keys are sha256 digests of everything that changes the distribution of answers (the black
box's fingerprint, the front end's weights, σ, the seed, the image, the noise generator, the
region and block): two keys are equal only when the answers are interchangeable. They never
hold a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from . import sqlitefile
from .blackbox import FILE_OTHER, MAX_CLASSES, Answer, labels_in, labels_out
from .errors import UsageError
from .redaction import remember
from .sqlitefile import NotRegular, SQLiteFile

DATABASE = "cache.db"
TABLE = "bbsmooth_entries"
SCHEMA = (
    f"CREATE TABLE {TABLE} (key TEXT PRIMARY KEY, kind INTEGER NOT NULL, queries INTEGER NOT "
    "NULL, value BLOB NOT NULL) WITHOUT ROWID"
)
KEY_ENV = "BBSMOOTH_CACHE_KEY"  # the shared cache's HMAC key: never stored, never printed
ANSWER, RECORD = 0, 1  # an entry's kind
PLAIN, SIGNED = b"BBS2", b"BBSA"  # sha256 of key and body; HMAC-SHA256 under $BBSMOOTH_CACHE_KEY
# The largest entry read back: 1,024 samples with scores for 16,000 classes. A larger value in
# the table was not written by us and is never loaded; a larger answer is not stored.
MAX_ENTRY_BYTES = 64 * 2**20


def default_cache_dir() -> Path:
    return Path(os.environ.get("BBSMOOTH_CACHE") or platformdirs.user_cache_dir("bbsmooth"))


def cache_key(**parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def encode(answer: Answer) -> bytes:
    """An answer's body: a JSON header (n, k), the labels as int32 (OTHER as -1), the scores
    as float32."""
    labels = np.ascontiguousarray(labels_out(answer.labels), dtype=np.int32)
    scores = None if answer.scores is None else np.ascontiguousarray(answer.scores, np.float32)
    header = json.dumps(
        {"n": int(labels.shape[0]), "k": None if scores is None else int(scores.shape[1])}
    ).encode()
    body = struct.pack("<I", len(header)) + header + labels.tobytes()
    if scores is not None:
        body += scores.tobytes()
    return body


def decode(body: bytes) -> Answer | None:
    """The answer in a body `encode` wrote, or None when it is not one (never trusted)."""
    try:
        (size,) = struct.unpack_from("<I", body)
        header = json.loads(body[4 : 4 + size])
        n, k = int(header["n"]), header["k"]
        offset = 4 + size
        if n < 0 or (k is not None and not 0 < int(k) <= MAX_CLASSES):
            return None
        if len(body) != offset + 4 * n + (0 if k is None else 4 * n * int(k)):
            return None
        labels = np.frombuffer(body, np.int32, n, offset).astype(np.int64)
        if n and (labels.min() < FILE_OTHER or labels.max() >= MAX_CLASSES):
            return None  # not an answer we wrote: ask again
        labels = labels_in(labels)
        offset += 4 * n
        scores = None
        if k is not None:
            scores = np.frombuffer(body, np.float32, n * int(k), offset).reshape(n, int(k)).copy()
        return Answer(labels, scores)
    except (ValueError, KeyError, TypeError, struct.error, AttributeError):
        return None


class Seal:
    """How entries are sealed: a sha256 of key and body, or an HMAC under the shared key."""

    def __init__(self, secret: str | None) -> None:
        remember(secret)  # redacted from every message from now on
        self._secret = secret.encode() if secret else None

    @classmethod
    def from_environment(cls) -> Seal:
        return cls(os.environ.get(KEY_ENV) or None)

    @property
    def signed(self) -> bool:
        return self._secret is not None

    def _tag(self, key: str, body: bytes) -> bytes:
        message = key.encode() + b"\0" + body
        if self._secret is None:
            return hashlib.sha256(message).digest()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def seal(self, key: str, body: bytes) -> bytes:
        return (SIGNED if self.signed else PLAIN) + self._tag(key, body) + body

    def open(self, key: str, value: object) -> bytes | None:
        """The body of an entry sealed by us under `key`, or None."""
        if not isinstance(value, bytes) or len(value) < 36:
            return None
        if value[:4] != (SIGNED if self.signed else PLAIN):
            return None
        body = value[36:]
        return body if hmac.compare_digest(value[4:36], self._tag(key, body)) else None


@dataclass(frozen=True)
class Contents:
    """What a cache holds, from SQL aggregates (no entry is read)."""

    blocks: int = 0  # answered noise blocks (and pieces of blocks)
    queries: int = 0  # the answers they hold
    records: int = 0  # small JSON records: the journal of `evaluate --ray`
    foreign: int = 0  # rows we did not write (another table, an unknown kind): never read


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

    def __init__(
        self,
        directory: str | os.PathLike[str],
        seal: Seal | None = None,
        *,
        readonly: bool = False,
    ) -> None:
        """`readonly`: to look at an existing cache (`cache info`) without writing to it."""
        self.directory = Path(directory)
        self.seal = seal or Seal.from_environment()
        self.rejected = 0  # entries found but not trusted: asked again
        check_folder(self.directory)
        if self.directory.is_symlink():
            raise UsageError(
                f"the cache folder {self.directory} is a symbolic link: give the folder it "
                "points to as --cache DIR (or --no-cache)"
            )
        try:
            if not readonly:
                self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error(e) from None
        self._file = SQLiteFile(self.directory / DATABASE, self._error, readonly)
        if not readonly:
            with self._file.writing() as db:
                db.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA.removeprefix('CREATE TABLE ')}")
        declared = self._file.schema(TABLE)
        if declared and declared != [("table", TABLE, TABLE, SCHEMA)]:
            raise UsageError(
                f"the cache {self.directory / DATABASE} holds a {TABLE} that bbsmooth did not "
                "make (a view, a trigger, another layout): move it aside, or give another "
                "--cache DIR (or --no-cache)"
            )
        if readonly:
            return
        with self._file.writing() as db:
            # SQLite opens a file it cannot write read-only without a word: a write that
            # changes nothing tells a read-only cache at open time, not after paid queries
            db.execute(f"DELETE FROM {TABLE} WHERE 0")

    def _error(self, e: BaseException) -> UsageError:
        """One line for a cache that cannot be used: what happened, where, what to do."""
        text = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        where, also = self.directory, "give another --cache DIR (or --no-cache)"
        if isinstance(e, NotRegular):
            return UsageError(f"the cache {text}: move it aside, or {also}")
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            return UsageError(f"the cache {where} is locked by another process ({text}): {also}")
        if "full" in lowered or "no space" in lowered or "quota" in lowered:
            return UsageError(f"the cache {where} cannot grow ({text}): free disk space, or {also}")
        if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError):
            return UsageError(
                f"the cache {where} is damaged ({text}): move {where / DATABASE} aside (bbsmooth "
                f"leaves it as it is), or {also}"
            )
        return UsageError(f"cannot use the cache {where} ({text}): make it writable, or {also}")

    def _read(self, key: str, kind: int) -> bytes | None:
        """The body of our entry `key` of `kind`, or None (absent, too large, not ours)."""
        with self._file.reading() as db:
            row = db.execute(
                f"SELECT value FROM {TABLE} WHERE key = ? AND kind = ? AND length(value) <= ?",
                (key, kind, MAX_ENTRY_BYTES + 36),
            ).fetchone()
        if row is None:
            return None
        body = self.seal.open(key, row[0])
        if body is None:
            self.rejected += 1
        return body

    def get(self, key: str) -> Answer | None:
        body = self._read(key, ANSWER)
        answer = None if body is None else decode(body)
        if body is not None and answer is None:
            self.rejected += 1
        return answer

    def put_many(self, items: list[tuple[str, Answer]], delete: Sequence[str] = ()) -> None:
        """Store `items` and drop the `delete` keys, all in one SQLite transaction."""
        rows = []
        for key, answer in items:
            body = encode(answer)
            if len(body) <= MAX_ENTRY_BYTES:  # a larger one could never be read back
                rows.append((key, ANSWER, len(answer.labels), self.seal.seal(key, body)))
        with self._file.writing() as db:
            db.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, ?, ?)", rows)
            db.executemany(f"DELETE FROM {TABLE} WHERE key = ?", [(k,) for k in delete])

    def get_record(self, key: str) -> Any:
        """A small JSON record stored with `put_record`, or None when there is none or it is
        not one we wrote (never trusted)."""
        body = self._read(key, RECORD)
        if body is None:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def put_record(self, key: str, value: Any) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        with self._file.writing() as db:
            db.execute(
                f"INSERT OR REPLACE INTO {TABLE} VALUES (?, ?, 0, ?)",
                (key, RECORD, self.seal.seal(key, body)),
            )

    def close(self) -> None:
        self._file.close()

    def contents(self) -> Contents:
        """What the cache holds, counted by SQL (fast on any size, reads no entry)."""
        with self._file.reading() as db:
            tables = [
                name
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            if TABLE not in tables:
                return Contents(foreign=sum(_rows(db, t) for t in tables))
            by_kind = dict(
                (kind, (count, total or 0))
                for kind, count, total in db.execute(
                    f"SELECT kind, count(*), sum(queries) FROM {TABLE} GROUP BY kind"
                )
            )
            foreign = sum(c for k, (c, _) in by_kind.items() if k not in (ANSWER, RECORD))
            foreign += sum(_rows(db, t) for t in tables if t != TABLE)
        blocks, queries = by_kind.get(ANSWER, (0, 0))
        return Contents(blocks, queries, by_kind.get(RECORD, (0, 0))[0], foreign)

    def clear(self) -> int:
        """Delete every answered block (rows only: no file is touched); the records stay.
        Returns the queries deleted."""
        with self._file.writing() as db:
            (queries,) = db.execute(
                f"SELECT coalesce(sum(queries), 0) FROM {TABLE} WHERE kind = ?", (ANSWER,)
            ).fetchone()
            db.execute(f"DELETE FROM {TABLE} WHERE kind = ?", (ANSWER,))
        return int(queries)

    def compact(self) -> None:
        """Give the space of deleted entries back to the file system (SQLite keeps it)."""
        try:
            with self._file.reading() as db:
                db.execute("VACUUM")
        except UsageError as e:
            raise UsageError(f"cleared the cache, but could not compact it: {e}") from e


def _rows(db: sqlite3.Connection, table: str) -> int:
    quoted = '"' + str(table).replace('"', '""') + '"'
    return int(db.execute(f"SELECT count(*) FROM {quoted}").fetchone()[0])


def disk_bytes(directory: Path) -> int:
    """Bytes the cache takes on disk: its database and SQLite's files beside it."""
    return sqlitefile.disk_bytes(directory / DATABASE)


def is_cache(directory: Path) -> bool:
    """Whether `directory` holds a cache (bbsmooth never opens, so never creates, one to look)."""
    path = directory / DATABASE
    return not path.is_symlink() and path.is_file()
