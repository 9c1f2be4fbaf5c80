"""The cached asynchronous vote aggregator.

`Votes.tally` answers "what does the black box say on the first n noisy samples of this
region?" block by block: replayed from the disk cache when a block was answered before,
otherwise drawn, sent in requests of at most `max_batch` images with at most `concurrency` in
flight, counted against the budget, and cached once the whole block is answered. A failed
request is retried with the same images by the adapter; it never becomes a vote.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .adapters.base import Answer, BlackBox
from .cache import BlockCache, cache_key
from .errors import BBSmoothError, BudgetExhausted
from .noise import NoiseStream

IN_FLIGHT_BYTES = 2**28  # noise blocks drawn but not yet answered: at most ~256 MiB


class Budget:
    """`--max-queries`: reserve before sending, so the limit is never crossed."""

    def __init__(self, max_queries: int | None = None) -> None:
        self.max_queries = max_queries
        self.reserved = 0

    @property
    def left(self) -> int | None:
        return None if self.max_queries is None else self.max_queries - self.reserved

    def reserve(self, k: int) -> None:
        if self.max_queries is not None and self.reserved + k > self.max_queries:
            left = self.max_queries - self.reserved
            raise BudgetExhausted(
                f"this needs {k} more queries but only {left} of --max-queries "
                f"{self.max_queries} are left; answered blocks are cached, so raise "
                "--max-queries and run again to resume"
            )
        self.reserved += k


@dataclass(frozen=True)
class Tally:
    counts: dict[int, int]
    sent: int  # queries sent to the black box for this tally
    cached: int  # answers replayed from the cache


@dataclass(frozen=True)
class Block:
    index: int
    need: int  # samples of this block the tally uses
    key: str
    answered: Answer | None  # what the cache already holds (a prefix of the block)

    @property
    def have(self) -> int:
        return 0 if self.answered is None else len(self.answered.labels)

    @property
    def missing(self) -> int:
        return max(0, self.need - self.have)


class Votes:
    """Answers of one black box on noise streams, shared by every image of a run."""

    def __init__(
        self,
        blackbox: BlackBox,
        cache: BlockCache | None = None,
        concurrency: int = 16,
        budget: Budget | None = None,
    ) -> None:
        self.blackbox = blackbox
        self.cache = cache
        self.concurrency = concurrency
        self.budget = budget or Budget()
        self.sent = 0
        self.cached = 0
        self._requests: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def plan(
        self,
        stream: NoiseStream,
        context: dict[str, Any],
        region: str,
        n: int,
        memory: dict[str, Answer] | None = None,
    ) -> list[Block]:
        """The blocks covering samples [0, n) of `region`, with what is already answered of each:
        in `memory` (this image's earlier looks) or in the cache."""
        blocks = []
        for index, need in stream.blocks(n):
            key = cache_key(**context, region=region, block=index, block_size=stream.block_size)
            answered = memory.get(key) if memory is not None else None
            if answered is None and self.cache is not None:
                answered = self.cache.get(key)
            blocks.append(Block(index, need, key, answered))
        return blocks

    async def tally(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        blocks: list[Block],
        region: str,
        progress: Callable[[int], None] | None = None,
        memory: dict[str, Answer] | None = None,
    ) -> Tally:
        """Votes of f(transform(x + δ_i)) over the planned blocks of `region`; answered blocks
        are also kept in `memory` when given."""
        self._bind_loop()
        labels: dict[int, np.ndarray] = {}
        sent = cached = 0
        for b in blocks:
            if b.missing == 0:
                assert b.answered is not None
                labels[b.index] = b.answered.labels[: b.need]
                cached += b.need
                if progress:
                    progress(b.need)

        todo = [b for b in blocks if b.missing > 0]
        # Enough blocks in flight to keep `concurrency` requests busy, within a memory bound.
        per_block = math.ceil(stream.block_size / self.blackbox.max_batch)
        block_bytes = 4 * stream.block_size * math.prod(stream.shape)
        by_memory = max(2, IN_FLIGHT_BYTES // block_bytes)
        in_flight = asyncio.Semaphore(min(by_memory, math.ceil(self.concurrency / per_block) + 1))

        async def answer_block(b: Block) -> None:
            nonlocal sent, cached
            async with in_flight:
                noisy = transform(x + stream.block(region, b.index, b.need)[b.have :])
                fresh = _stack(await self._send(noisy))
                answer = fresh if b.answered is None else _stack([b.answered, fresh])
                if self.cache is not None:
                    self.cache.put(b.key, answer)
                if memory is not None:
                    memory[b.key] = answer
                labels[b.index] = answer.labels[: b.need]
                sent += b.missing
                cached += b.have
                self.sent += b.missing
                if progress:
                    progress(b.need)

        try:
            async with asyncio.TaskGroup() as group:
                for b in todo:
                    group.create_task(answer_block(b))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        self.cached += cached
        votes = np.concatenate([labels[b.index] for b in blocks]) if blocks else np.array([])
        values, counts = np.unique(votes, return_counts=True)
        return Tally({int(v): int(c) for v, c in zip(values, counts, strict=True)}, sent, cached)

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._requests is None or self._loop is not loop:  # a semaphore belongs to one loop
            self._requests, self._loop = asyncio.Semaphore(self.concurrency), loop

    async def ask(self, images: torch.Tensor) -> Answer:
        """The black box's answers on these exact inputs (training, validation): each input is
        cached under its own digest, so an input asked before costs nothing."""
        self._bind_loop()
        batch = images.detach().to(torch.float32).contiguous()
        flat = batch.reshape(len(batch), -1).cpu().numpy()
        keys = [
            cache_key(blackbox=self.blackbox.fingerprint, input=hashlib.sha256(row).hexdigest())
            for row in flat
        ]
        found: list[Answer | None] = [
            self.cache.get(k) if self.cache is not None else None for k in keys
        ]
        missing = [i for i, a in enumerate(found) if a is None]
        self.budget.reserve(len(missing))
        if missing:
            answered = _split(await self._send(batch[missing]))
            for i, answer in zip(missing, answered, strict=True):
                found[i] = answer
            if self.cache is not None:
                self.cache.put_many([(keys[i], a) for i, a in zip(missing, answered, strict=True)])
        self.sent += len(missing)
        self.cached += len(images) - len(missing)
        return _stack([a for a in found if a is not None])

    async def _send(self, images: torch.Tensor) -> list[Answer]:
        step = self.blackbox.max_batch
        assert self._requests is not None

        async def one(chunk: torch.Tensor) -> Answer:
            async with self._requests:
                answer = await self.blackbox.classify(chunk)
            if len(answer.labels) != len(chunk):  # adapters check this too; never miscount
                raise BBSmoothError(f"black box answered {len(answer.labels)} of {len(chunk)}")
            return answer

        chunks = [images[i : i + step] for i in range(0, len(images), step)]
        if len(chunks) == 1:
            return [await one(chunks[0])]
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest of the block
            tasks = [group.create_task(one(c)) for c in chunks]
        return [t.result() for t in tasks]


def _split(parts: list[Answer]) -> list[Answer]:
    """One Answer per image."""
    out = []
    for p in parts:
        for i in range(len(p.labels)):
            out.append(
                Answer(p.labels[i : i + 1], None if p.scores is None else p.scores[i : i + 1])
            )
    return out


def _stack(parts: list[Answer]) -> Answer:
    """One Answer from several in order; scores only when every part has them, of one width."""
    widths = {None if p.scores is None else p.scores.shape[1] for p in parts}
    scores = None
    if len(widths) == 1 and None not in widths:
        scores = np.concatenate([p.scores for p in parts if p.scores is not None])
    return Answer(np.concatenate([p.labels for p in parts]), scores)


def _first_error(eg: BaseExceptionGroup) -> BaseException:
    """The first real error inside a (possibly nested) exception group."""
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        return exc
    return eg
