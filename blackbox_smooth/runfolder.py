"""Output folders: claimed before a command starts, replaced whole when it writes.

A command writes only where it may: `claim` accepts a new folder, or a folder this kind of
command wrote before (its marker file inside, and nothing else but the files that kind writes);
anything else, and any folder that holds or lies inside one of the command's inputs, is refused
before work starts. A user's files are never deleted or overwritten.

Writes are whole: the new folder is filled beside the old one and swapped in by two renames
(out → .out.bbsmooth-old, new → out); a crash between them leaves only the old one, which
`recover` (called before every read and write) puts back. A failed or interrupted command
leaves the previous outputs exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import UsageError

MARKER = ".bbsmooth-run"  # {"kind": …} inside every folder a command wrote
FRONTEND, LORA, EVALUATION = "front-end run", "LoRA adapter run", "evaluation"
# What each kind of folder holds; a folder with anything else in it is not ours to replace.
# Each kind's own settings file; runs written before they had names of their own called both
# config.json, which is still read (and replaced whole by the next write).
SETTINGS = {FRONTEND: "frontend.json", LORA: "lora_run.json"}
LEGACY_SETTINGS = "config.json"
FILES = {
    FRONTEND: {SETTINGS[FRONTEND], LEGACY_SETTINGS, "frontend.safetensors"},
    LORA: {
        SETTINGS[LORA],
        LEGACY_SETTINGS,
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    },
    EVALUATION: {"certify.tsv", "summary.json", "certified_accuracy.png"},
}
SIGNATURE = {
    FRONTEND: {SETTINGS[FRONTEND], LEGACY_SETTINGS},
    LORA: {"adapter_config.json"},
    EVALUATION: {"certify.tsv"},
}


def settings_file(run: str | os.PathLike[str], kind: str) -> Path:
    """The settings file of a run of `kind`: its own name, or config.json in an older run."""
    own = Path(run) / SETTINGS[kind]
    legacy = Path(run) / LEGACY_SETTINGS
    return legacy if not os.path.lexists(own) and os.path.lexists(legacy) else own


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.bbsmooth-old")


def _new_prefix(out: Path) -> str:
    return f".{out.name}.bbsmooth-new."


def recover(out: str | os.PathLike[str]) -> None:
    """Put back the previous folder if a swap was interrupted half-way."""
    out = Path(out)
    if not out.exists() and _old(out).is_dir():
        os.replace(_old(out), out)


def claim(
    out: str | os.PathLike[str], kind: str, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """Check, before any work, that a command of `kind` may write the folder `out`; returns
    it. Refused (UsageError): a file, a folder that holds anything this kind does not write or
    was written by another kind, and a folder that holds, is, or lies inside an input."""
    out = Path(out)
    recover(out)
    where = Path(os.path.abspath(out))
    for item in inputs:
        if item is None:
            continue
        path = Path(os.path.abspath(item))
        if path == where or where in path.parents:
            raise UsageError(
                f"--out {out} holds this command's input {item}: write to a new folder"
            )
        if path in where.parents and path.is_dir():
            raise UsageError(
                f"--out {out} lies inside this command's input {item}: write to a folder outside it"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} is not a folder: give the name of a new folder")
    if out.is_dir():
        _check_ours(out, kind)
    return out


def remove(out: str | os.PathLike[str], kind: str) -> None:
    """Delete a folder that a command of `kind` wrote, checked as `claim` checks it (the demo
    redoing its own stale run); its files only, then the emptied folder."""
    out = claim(out, kind)
    if out.is_dir():
        for name in FILES[kind] | {MARKER}:
            (out / name).unlink(missing_ok=True)
        out.rmdir()


def _check_ours(out: Path, kind: str) -> None:
    names = {p.name for p in out.iterdir()}
    if not names:
        return  # an empty folder: nothing in it to lose
    written_by = _marker_kind(out)
    if written_by is None and not SIGNATURE[kind] & names:
        raise UsageError(
            f"--out {out} already exists and was not written by bbsmooth: give a new folder "
            "(bbsmooth never replaces a folder it did not create)"
        )
    if written_by is not None and written_by != kind:
        raise UsageError(
            f"--out {out} holds a bbsmooth {written_by}, not a {kind}: give a new folder"
        )
    foreign = sorted(names - FILES[kind] - {MARKER})
    if foreign:
        raise UsageError(
            f"--out {out} holds {foreign[0]!r}, which bbsmooth did not write: move it away "
            "or give a new folder"
        )


def _marker_kind(out: Path) -> str | None:
    marker = out / MARKER
    if not marker.is_file() or marker.stat().st_size > 4096:
        return None
    try:
        kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (ValueError, AttributeError, OSError):
        return None
    return kind if kind in FILES else None


def write_atomically(out: str | os.PathLike[str], write: Callable[[Path], None], kind: str) -> None:
    """Call `write(tmp)` to fill a fresh folder beside `out`, mark it as `kind`, then swap it
    in for `out` (which `claim` has checked is new or ours)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    for stale in out.parent.glob(_new_prefix(out) + "*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_new_prefix(out)))
    old = _old(out)
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a run folder is not
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def claim_file(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """A single output file (a plot) may be written when it is new or a PNG bbsmooth wrote
    (recognised by its Software text chunk), and is none of the command's inputs."""
    path = Path(path)
    where = os.path.abspath(path)
    if any(os.path.abspath(item) == where for item in inputs):
        raise UsageError(f"--out {path} is one of this command's inputs: give another file name")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder: give a .png file name")
    ours = path.is_file() and not path.is_symlink() and written_by_us(path)
    if (path.exists() or path.is_symlink()) and not ours:
        raise UsageError(
            f"--out {path} already exists and was not written by bbsmooth: give a new file "
            "name (bbsmooth never overwrites a file it did not create)"
        )
    return path


PNG_SOFTWARE = "bbsmooth"


def written_by_us(png: Path) -> bool:
    """Whether `png` is a plot bbsmooth wrote (its tEXt Software chunk says so)."""
    from PIL import Image

    if png.stat().st_size > 64 << 20:
        return False
    try:
        with Image.open(png) as image:
            return getattr(image, "text", {}).get("Software", "").startswith(PNG_SOFTWARE)
    except (OSError, ValueError, SyntaxError):
        return False


def write_file_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace one file whole: written beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.bbsmooth-*.tmp"):  # a write that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.bbsmooth-", suffix=".tmp")
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
