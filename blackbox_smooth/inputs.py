"""Reading the user's files: regular files only, bounded in size, validated before anything is
allocated.

A path on the command line may name anything: a FIFO (opening it would wait for a writer
forever), /dev/zero or /dev/urandom (endless), a folder, a socket, a file of many gigabytes, a
JSON document nested a hundred thousand levels deep. Every reader here opens without blocking
(`O_NONBLOCK`), looks at what it opened (`fstat`) and refuses, in one `UsageError` line, what
is not a regular file or is larger than the limit for that kind of file; it never reads more
than the limit plus one byte, since a size can lie (files in /proc claim 0 bytes).
"""

from __future__ import annotations

import math
import os
import stat
from typing import Any

import orjson

from .errors import UsageError
from .redaction import printable

MiB = 1 << 20
MAX_IMAGE_BYTES = 256 * MiB  # an image file (decoding is bounded by Pillow's bomb check)
MAX_CONFIG_BYTES = 16 * MiB  # label maps, vendor configs, run configs, adapter configs
MAX_CSV_BYTES = 64 * MiB  # a data set's path,label CSV
MAX_SOURCE_BYTES = 16 * MiB  # a python:FILE.py / torch:FILE.py source file
MAX_JSON_DEPTH = 64  # nested objects and lists in any JSON file we read
_CHUNK = MiB

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


def size_text(size: int) -> str:
    if size >= MiB:
        return f"{size / MiB:,.1f} MiB".replace(".0 MiB", " MiB")
    return f"{size:,} bytes"


def memory_bytes() -> int:
    """Physical memory: a model file larger than this cannot be loaded."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - not on Linux or macOS
        return 1 << 40


def open_regular(path: str | os.PathLike[str], what: str, expect: str = "a file") -> int:
    """A descriptor of `path`, opened without blocking, or UsageError when it is missing,
    unreadable or not a regular file. `what` names the input (`--labels`, `image`, …), `expect`
    says what to give instead (`a JSON or CSV file`). The caller closes the descriptor."""
    path = os.fspath(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found: give {expect}") from None
    except PermissionError:
        raise UsageError(f"{what} {path} cannot be read (permission denied)") from None
    except OSError as e:  # a socket (ENXIO), a name too long, a loop of links, …
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise UsageError(
                f"{what} {path} is not a regular file ({_kind(mode)}): give {expect}"
            ) from None
        raise UsageError(f"{what} {path} cannot be opened: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(f"{what} {path} is not a regular file ({_kind(mode)}): give {expect}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_file(
    path: str | os.PathLike[str], what: str, limit: int | None = None, expect: str = "a file"
) -> int:
    """Refuse `path` unless it is a regular file of at most `limit` bytes; its size. For files
    that a library opens itself (torch.jit.load, safetensors, peft): never blocks."""
    fd = open_regular(path, what, expect)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    _check_size(size, path, what, limit)
    return size


def _check_size(size: int, path: str | os.PathLike[str], what: str, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise UsageError(
            f"{what} {os.fspath(path)} is larger than {size_text(limit)}, the most bbsmooth "
            "reads for it: is it the right file?"
        )


def read_bytes(
    path: str | os.PathLike[str], what: str, limit: int, expect: str = "a file"
) -> bytes:
    """The whole content of the regular file `path`, at most `limit` bytes, or UsageError."""
    fd = open_regular(path, what, expect)
    try:
        size = os.fstat(fd).st_size
        _check_size(size, path, what, limit)
        parts: list[bytes] = []
        total = 0
        want = min(size, limit) + 1  # one read for an honest size; more only if it lied
        while total <= limit:
            chunk = os.read(fd, min(want, limit + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            want = _CHUNK
    except OSError as e:
        raise UsageError(f"{what} {os.fspath(path)} could not be read: {e.strerror or e}") from e
    finally:
        os.close(fd)
    _check_size(total, path, what, limit)
    return b"".join(parts)


def decode_text(data: bytes, path: str | os.PathLike[str], what: str) -> str:
    """UTF-8 (a byte-order mark is allowed), or UsageError."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} {os.fspath(path)} is not UTF-8 text ({e.reason} at byte {e.start}): "
            "save it as UTF-8"
        ) from None


def read_text(
    path: str | os.PathLike[str], what: str, limit: int = MAX_CONFIG_BYTES, expect: str = "a file"
) -> str:
    """A UTF-8 text file (BOM allowed), bounded and regular, or UsageError."""
    return decode_text(read_bytes(path, what, limit, expect), path, what)


def parse_json(data: bytes | str, where: str, depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON (no NaN or Infinity, no number beyond a double) nested at most `depth`
    levels, or UsageError; `where` names the source in the message."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        value = orjson.loads(data)  # iterative enough: stops itself at 1024 levels
    except orjson.JSONDecodeError as e:
        if "depth" in str(e):
            raise UsageError(f"{where} nests deeper than {depth} levels: flatten it") from None
        raise UsageError(f"{where} is not valid JSON ({e})") from None
    if too_deep(value, depth):
        raise UsageError(f"{where} nests deeper than {depth} levels: flatten it")
    return value


def too_deep(value: Any, depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests lists and objects more than `depth` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if level > depth:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def read_json(
    path: str | os.PathLike[str],
    what: str,
    limit: int = MAX_CONFIG_BYTES,
    expect: str = "a JSON file",
    depth: int = MAX_JSON_DEPTH,
) -> Any:
    """A JSON file: regular, at most `limit` bytes, strict, nested at most `depth` levels."""
    data = read_bytes(path, what, limit, expect)
    return parse_json(data, f"{what} {os.fspath(path)}", depth)


# -- checking the values of a JSON object against what they must be ----------------------------


def is_int(value: Any) -> bool:
    """An integer, not a bool (JSON's true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def want_int(data: dict[str, Any], key: str, where: str, low: int, high: int | None) -> int:
    value = data[key]
    span = f"{low}..{high}" if high is not None else f">= {low}"
    if not is_int(value):
        raise UsageError(f"{where}: {key!r} must be an integer {span}, not {shown(value)}")
    if value < low or (high is not None and value > high):
        raise UsageError(f"{where}: {key!r} is {shown(value)}, outside {span}")
    return value


def want_float(
    data: dict[str, Any], key: str, where: str, positive: bool = True, allow_zero: bool = False
) -> float:
    value = data[key]
    ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    if ok and positive:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        sign = "" if not positive else " >= 0" if allow_zero else " > 0"
        raise UsageError(f"{where}: {key!r} must be a finite number{sign}, not {shown(value)}")
    return float(value)


def want_str(
    data: dict[str, Any], key: str, where: str, null: bool = False, limit: int = 4096
) -> str | None:
    value = data[key]
    if value is None and null:
        return None
    if not isinstance(value, str) or len(value) > limit:
        kind = "a string" + (" or null" if null else "")
        raise UsageError(
            f"{where}: {key!r} must be {kind} of at most {limit} characters, not {shown(value)}"
        )
    return value


def shown(value: Any) -> str:
    """A short, printable rendering of a value from a user's file, for a message."""
    if isinstance(value, bool) or value is None:
        return "true" if value is True else "false" if value is False else "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return printable(repr(value) if isinstance(value, str) else str(value), 40)
