"""The one memory budget of a run (`--max-memory`) and each part's share of it.

What a run holds in images grows with their size: noise blocks drawn ahead, requests being
built and sent, a local model's forward pass, a front end's activations while it trains. Each
is sized from its share of one budget, so that a 320×320 model runs in the memory a 28×28 one
does, only in smaller steps; the shares are those of the defaults the project measured (at
1 GiB: 256 MiB of noise in flight, 256 MiB of requests, 256 MiB for a local forward pass).

The budget is the run's: set once where the options are read (`use`), read where memory is
spent (`scaled`); it lives in a context variable, so two runs in one process keep their own.
"""

from __future__ import annotations

import ctypes
import re
from contextvars import ContextVar
from typing import Any

from .errors import UsageError

GiB = 2**30
DEFAULT_MAX_MEMORY = "1G"
SMALLEST = 64 * 2**20  # below this the shares are smaller than one 224×224 request

_budget: ContextVar[int] = ContextVar("max_memory", default=GiB)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str, flag: str = "--max-memory") -> int:
    """`1G`, `1.5G`, `800M`, `800MiB`, `1073741824` → bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not found:
        raise UsageError(f"{flag} {text!r} is not a size: give e.g. 1G, 1.5G or 800M")
    size = int(float(found[1]) * _UNITS[found[2].upper()])
    if size < SMALLEST:
        raise UsageError(f"{flag} {text} is below the smallest budget that works, 64M")
    return size


def use(max_memory: str | int) -> None:
    """This run's budget, from the option as given."""
    _budget.set(max_memory if isinstance(max_memory, int) else parse_bytes(max_memory))


def budget() -> int:
    return _budget.get()


def scaled(share_at_default: int) -> int:
    """A share given as its size under the default budget, scaled to this run's."""
    return max(1, share_at_default * _budget.get() // GiB)


def release() -> None:
    """Give the memory a finished step freed back to the system (glibc keeps freed blocks in
    its heap, so a 320×320 run's resident size only ever grew, step after step); elsewhere,
    nothing to do."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Any = None
