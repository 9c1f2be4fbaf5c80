"""The canary: a model behind an address may change while its cached answers stay, so before
the first cached block is replayed, its first samples are asked again and must agree. A cache
refused once stays refused for the object's life; blocks the object stored itself need no
check."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from .errors import UsageError

# The samples of a cached block asked again: their labels, on its first `k` samples.
AskAgain = Callable[[int], Awaitable[np.ndarray]]


class Canary:
    """One check of a cache's answers, shared by the images certified at once."""

    def __init__(self, size: int) -> None:
        self.size = size  # samples asked again (0: no check)
        self.sent = 0  # queries the check cost
        self._done = size == 0
        # blocks stored by this object before the check: trusted without it
        self._written: set[str] | None = None if size == 0 else set()
        self._lock: asyncio.Lock | None = None
        self._failed: UsageError | None = None  # the refusal, repeated to every replay

    def bind(self) -> None:
        """A new event loop: a lock belongs to one."""
        self._lock = asyncio.Lock()

    def trusts(self, key: str) -> bool:
        """Whether the block `key` was stored by this object (so needs no check)."""
        return key in (self._written or ())

    def stored(self, key: str) -> None:
        if self._written is not None:
            self._written.add(key)

    async def check(self, cached: np.ndarray, ask_again: AskAgain) -> int:
        """Before the block whose cached labels are `cached` is replayed: ask its first samples
        again (once per object) and refuse the cache when the answers differ (the model
        changed, or --endpoint-id names another). Returns the queries sent."""
        if self._failed is not None:
            raise self._failed  # once refused, never replayed by this object
        if self._done:
            return 0
        assert self._lock is not None
        async with self._lock:  # images certified at once wait for one check
            if self._failed is not None:
                raise self._failed
            if self._done:
                return 0
            k = min(self.size, len(cached))
            now = await ask_again(k)
            self.sent += k
            differ = int(np.sum(now[:k] != cached[:k]))
            if differ:
                self._failed = UsageError(
                    f"the endpoint now answers {differ} of {k} cached samples differently: the "
                    "model behind it changed since its answers were cached (or --endpoint-id "
                    "names another model); run with --no-cache, or give another --cache DIR"
                )
                raise self._failed
            self._done, self._written = True, None
            return k
