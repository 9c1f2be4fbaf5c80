"""Run folders (front ends, LoRA adapters) and report files are replaced whole: a crash
mid-write leaves the previous version, never a mix of two.

The swap is two renames (out → .out.old, new → out); a crash between them leaves only
.out.old, which `recover` (called before every read and write) puts back."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def recover(out: str | os.PathLike[str]) -> None:
    """Put back the previous checkpoint if a swap was interrupted half-way."""
    out = Path(out)
    if not out.exists() and _old(out).is_dir():
        os.replace(_old(out), out)


def write_atomically(out: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a fresh folder beside `out`, then swap it in for `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    for stale in out.parent.glob(f".{out.name}.new.*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new."))
    old = _old(out)
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_file_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace one file whole: written beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a report is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
