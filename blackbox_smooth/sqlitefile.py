"""An SQLite file of ours (the cache, the evidence ledger): one connection shared by threads,
writes in IMMEDIATE transactions, and every SQLite or file-system error turned into its owner's
one-line UsageError. The file and SQLite's files beside it must be regular files: SQLite would
write through a link into a file of the user's, and wait forever on a FIFO."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UsageError

ERRORS = (sqlite3.Error, OSError)
STATEMENT_SECONDS = 60.0  # no statement runs longer: a crafted view or trigger cannot hang us
SIDE_FILES = ("", "-wal", "-shm", "-journal")  # the database and what SQLite keeps beside it


def irregular(path: Path) -> Path | None:
    """The first of the database's files that exists and is not a regular file, or None."""
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            mode = os.lstat(side).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            return side
    return None


def disk_bytes(path: Path) -> int:
    """Bytes the database takes on disk with SQLite's files beside it (regular files only)."""
    total = 0
    for suffix in SIDE_FILES:
        with contextlib.suppress(OSError):
            st = os.lstat(path.with_name(path.name + suffix))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class SQLiteFile:
    """`path` opened (read-only when asked, never created then), its errors told by `error`."""

    def __init__(
        self,
        path: Path,
        error: Callable[[BaseException], UsageError],
        readonly: bool = False,
    ) -> None:
        self.path, self._error = path, error
        self._lock = threading.Lock()
        try:
            odd = irregular(path)
        except OSError as e:
            raise error(e) from None
        if odd is not None:
            raise error(NotRegular(f"{odd} is not a regular file"))
        try:
            self._db = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro" if readonly else path,
                timeout=60, isolation_level=None, check_same_thread=False, uri=readonly,
            )  # fmt: skip
            # a schema someone else wrote runs no function of theirs, and no query forever
            self._db.execute("PRAGMA trusted_schema=OFF")
            self._deadline = time.monotonic() + STATEMENT_SECONDS
            self._db.set_progress_handler(self._too_long, 100_000)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
        except ERRORS as e:
            raise error(e) from None

    def _too_long(self) -> int:
        return int(time.monotonic() > self._deadline)  # non-zero: SQLite interrupts

    def schema(self, table: str) -> list[tuple[str, str, str, str]]:
        """Everything the file declares on or as `table`: (type, name, table, sql)."""
        with self.reading() as db:
            return db.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE tbl_name = ? OR "
                "name = ?",
                (table, table),
            ).fetchall()

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._lock:
                self._deadline = time.monotonic() + STATEMENT_SECONDS
                yield self._db
        except ERRORS as e:
            raise self._error(e) from None

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction: all of it or none of it."""
        try:
            with self._lock:
                self._deadline = time.monotonic() + STATEMENT_SECONDS
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except ERRORS as e:
            raise self._error(e) from None

    def close(self) -> None:
        with self.reading() as db:
            db.close()


class NotRegular(OSError):
    """A database file that is a link, a FIFO or a device."""
