"""The cache jobs: what a cache folder holds (`cache info`), and emptying it (`cache clear`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..cache import BlockCache, check_folder, default_cache_dir, disk_bytes, is_cache


@dataclass(frozen=True)
class CacheReport:
    """What a cache folder holds: answered noise blocks (and the queries in them), records
    (the journal of `evaluate --ray`), rows it did not write (never read), bytes on disk.
    `exists` is False where no cache has been written yet."""

    directory: Path
    exists: bool
    blocks: int = 0
    queries: int = 0
    records: int = 0
    foreign: int = 0
    bytes: int = 0


def cache_info(directory: Path | None = None) -> CacheReport:
    """The cache at `directory` (default: $BBSMOOTH_CACHE, else the user cache), read only:
    looking never creates or changes one."""
    directory = directory or default_cache_dir()
    check_folder(directory)
    if not is_cache(directory):
        return CacheReport(directory, exists=False)
    store = BlockCache(directory, readonly=True)
    try:
        c = store.contents()
    finally:
        store.close()
    return CacheReport(
        directory, True, c.blocks, c.queries, c.records, c.foreign, disk_bytes(directory)
    )


def clear_cache(directory: Path) -> tuple[int, CacheReport]:
    """Delete every answered block in the cache at `directory` (they cost queries to get
    again) and give the space back: the queries deleted, and the cache after. Rows are
    deleted, never files: nothing but the cache's own entries is touched. The evidence ledger
    lives elsewhere (ledger.py) and is never cleared."""
    store = BlockCache(directory)
    try:
        queries = store.clear()
        store.compact()
    finally:
        store.close()
    return queries, cache_info(directory)
