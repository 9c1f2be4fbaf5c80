"""The cached asynchronous vote aggregator.

`Votes.tally` answers "what does the black box say on the first n noisy samples of this
region?" block by block: replayed from the disk cache when a block was answered before,
otherwise drawn, sent in requests of at most `max_batch` images with at most `concurrency` in
flight, and counted against the budget. Each answered request is cached at once (a "piece" of
its block: it was paid for, and a fault or a kill later in the block must not lose it); once the
whole block is answered its pieces are merged into one entry. A failed request is retried with
the same images by the adapter; it never becomes a vote. A request the server refuses for its
size (HTTP 413, unanswered: not counted as sent) is sent again split in halves, and no request
of the run is that large again (told once, as a warning). Its parts: the planned blocks
(blocks.py), the budget (budget.py), the check of a cache before it is replayed (canary.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .blackbox import Answer, BlackBox
from .blocks import Block, piece_key
from .budget import Budget, count_sent
from .cache import BlockCache, cache_key
from .canary import Canary
from .errors import BBSmoothError, RequestTooLarge, first_error, warn
from .memory import release, scaled
from .noise import NoiseStream

# What the client holds for queries not yet answered, in two shares of --max-memory (their
# sizes under the default 1 GiB, scaled to the run's): the noise blocks drawn (256 MiB), and
# the requests being sent (each one's wire tensor and encoded body, or a local model's forward
# pass: 256 MiB, whatever --batch and --concurrency ask; answers are bounded by
# --max-response-bytes).
IN_FLIGHT_BYTES = 2**28
REQUEST_BYTES = 2**28


RELEASE_AFTER = 2**27  # a tally whose new blocks held this much gives the memory back


def block_bytes_of(stream: NoiseStream) -> int:
    """What one noise block holds: float32 images."""
    return 4 * stream.block_size * math.prod(stream.shape)


@dataclass(frozen=True)
class Tally:
    counts: dict[int, int]
    sent: int  # queries sent to the black box for this tally
    cached: int  # answers replayed from the cache


class Votes:
    """Answers of one black box on noise streams, shared by every image of a run."""

    def __init__(
        self,
        blackbox: BlackBox,
        cache: BlockCache | None = None,
        concurrency: int = 16,
        budget: Budget | None = None,
        charge_cached: bool = False,
        canary: int = 0,
        copies: int = 1,
    ) -> None:
        self.blackbox = blackbox
        # what a noise block in flight holds, in copies of itself: 2 where a front end's output
        # stands beside the noisy images until both are sent
        self.copies = copies
        self.canary = Canary(canary)  # a cached model's answers asked again before a replay
        # Training charges answers replayed from the cache to the budget too, so that a run
        # resumed after a fault or a kill spends exactly as the uninterrupted one would.
        self.charge_cached = charge_cached
        self.cache = cache
        self.concurrency = concurrency
        self.budget = budget or Budget()
        self.sent = 0
        self.on_asked: Callable[[int], None] | None = None  # `ask`'s progress, as answers come
        self.cached = 0
        self._requests: asyncio.Semaphore | None = None
        self._memory: asyncio.Semaphore | None = None  # blocks drawn, not yet answered
        self._bodies: asyncio.Semaphore | None = None  # requests being built or sent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unstored: dict[str, Answer] = {}  # answered, written at the event loop's next turn
        self._store_error: Exception | None = None  # raised by a deferred write, not yet told
        # Images per request the server took: lowered when it refuses a request for its size
        # (HTTP 413), for the rest of the run; the smallest size refused; the size told.
        self._max_request: int | None = None
        self._refused: int | None = None
        self._told: int | None = None

    @property
    def canary_sent(self) -> int:
        """Queries the canary's check cost (also in `sent`)."""
        return self.canary.sent

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
            from_cache = False
            if answered is None and self.cache is not None:
                answered = self.cache.get(key)
                from_cache = answered is not None and not self.canary.trusts(key)
            block = Block(index, need, key, answered, from_cache=from_cache)
            if self.cache is not None and block.have < need:
                self._find_pieces(block, self.request_size(math.prod(stream.shape)))
            blocks.append(block)
        return blocks

    def request_size(self, values_per_image: int) -> int:
        """Images per request: `max_batch` (--batch), or fewer where one request that large
        would alone hold more than REQUEST_BYTES (at 224×224 as JSON: 111 images), or than
        the server took (`_max_request`: it refused larger requests with HTTP 413)."""
        most = self.blackbox.max_batch
        if self._max_request is not None:
            most = min(most, self._max_request)
        per_image = self._wire_bytes(values_per_image)
        if per_image <= 0:
            return most
        return max(1, min(most, int(scaled(REQUEST_BYTES) // per_image)))

    def _wire_bytes(self, values_per_image: int) -> float:
        """What one image holds while its request is built and sent (0: nothing to say)."""
        return values_per_image * self.blackbox.wire_bytes_per_value

    def _find_pieces(self, block: Block, step: int) -> None:
        """Pieces cached by an earlier run with the same request size, cut short."""
        assert self.cache is not None
        start = block.have
        while start < block.need:
            piece = self.cache.get(piece_key(block.key, start))
            if piece is not None and start + len(piece.labels) <= block.need:
                block.pieces[start] = piece
                start += len(piece.labels)
            else:
                start += step

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
        sent += await self._check_replay(stream, x, transform, blocks, region)
        for b in blocks:
            if b.missing == 0:
                assert b.answered is not None
                labels[b.index] = b.answered.labels[: b.need]
                cached += b.need
                if progress:
                    progress(b.need)

        todo = [b for b in blocks if b.missing > 0]
        # Enough blocks in flight to keep `concurrency` requests busy, and across all the images
        # certified at once no more noise drawn than IN_FLIGHT_BYTES holds.
        step = self.request_size(math.prod(stream.shape))
        per_block = math.ceil(stream.block_size / step)
        in_flight = asyncio.Semaphore(math.ceil(self.concurrency / per_block) + 1)
        if self._memory is None:
            block_bytes = block_bytes_of(stream) * self.copies
            self._memory = asyncio.Semaphore(max(2, scaled(IN_FLIGHT_BYTES) // block_bytes))
        memory_bound = self._memory

        async def answer_block(b: Block) -> None:
            nonlocal sent, cached
            async with in_flight, memory_bound:
                labels[b.index] = await self._answer(stream, x, transform, b, region, memory)
                sent += b.missing
                cached += b.need - b.missing
                if progress:
                    progress(b.need)

        try:
            async with asyncio.TaskGroup() as group:
                for b in todo:
                    group.create_task(answer_block(b))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            self._store_now()  # a block cut short by an error keeps what was answered
        self.cached += cached
        if todo and block_bytes_of(stream) * len(todo) >= RELEASE_AFTER:
            release()  # large images: what the blocks held goes back, not to the heap
        votes = np.concatenate([labels[b.index] for b in blocks]) if blocks else np.array([])
        values, counts = np.unique(votes, return_counts=True)
        return Tally({int(v): int(c) for v, c in zip(values, counts, strict=True)}, sent, cached)

    async def _answer(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        b: Block,
        region: str,
        memory: dict[str, Answer] | None,
    ) -> np.ndarray:
        """Draw one block's missing samples, ask them, cache the block (and keep it in `memory`
        when given); its labels."""
        # drawn off the event loop, so that requests go out meanwhile and, the draws
        # releasing the GIL, blocks are drawn on several cores at once
        noisy = await asyncio.to_thread(
            lambda: transform(stream.noisy(x, region, b.index, b.need)[b.have :])
        )
        gaps = b.gaps(self.request_size(math.prod(stream.shape)))  # lowered on a 413
        pieces = dict(b.pieces)

        def keep(i: int, answer: Answer) -> None:
            pieces[gaps[i][0]] = answer
            if len(gaps) > 1:  # one request: the block entry below is enough
                self._store_soon(piece_key(b.key, gaps[i][0]), answer)

        chunks = [noisy[start - b.have : stop - b.have] for start, stop in gaps]
        await self._send(chunks, keep)
        parts = [] if b.answered is None else [b.answered]
        answer = Answer.stack(parts + [pieces[start] for start in sorted(pieces)])
        assert len(answer.labels) == b.need
        if self.cache is not None:  # one entry for the block; its pieces go
            stored = [piece_key(b.key, k) for k in pieces]
            for key in stored:
                self._unstored.pop(key, None)
            await asyncio.to_thread(self.cache.put_many, [(b.key, answer)], stored)
            self.canary.stored(b.key)
        if memory is not None:
            memory[b.key] = answer
        self.sent += b.missing
        return answer.labels[: b.need]

    async def _check_replay(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        blocks: list[Block],
        region: str,
    ) -> int:
        """The canary's check (canary.py) before the first cached block of `blocks` is
        replayed; the queries it sent."""
        replayed = next((b for b in blocks if b.from_cache), None)
        if replayed is None or replayed.answered is None:
            return 0
        block = replayed

        async def ask_again(k: int) -> np.ndarray:
            return await self._ask_again(stream, x, transform, block, region, k)

        return await self.canary.check(replayed.answered.labels, ask_again)

    async def _ask_again(
        self,
        stream: NoiseStream,
        x: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        block: Block,
        region: str,
        k: int,
    ) -> np.ndarray:
        """The black box's labels on the first `k` samples of a cached block, asked again."""
        await self.budget.reserve(k)
        noisy = await asyncio.to_thread(lambda: transform(stream.noisy(x, region, block.index, k)))
        assert self._requests is not None
        now = await self._classify(noisy, self._requests, None)
        self.sent += k
        return now.labels

    def _store_soon(self, key: str, answer: Answer) -> None:
        """Cache an answer at the event loop's next turn: the answers of one turn share a
        transaction (one per request costs ~10% at batch 1)."""
        if self.cache is None:
            return
        self._raise_store_error()
        if not self._unstored:
            asyncio.get_running_loop().call_soon(self._store_later)
        self._unstored[key] = answer

    def _store_later(self) -> None:
        """`_store_now` as an event-loop callback: an error there (a cache that became
        unusable, a full disk) would only be logged by the loop, so it is kept and raised by
        the next store, in the task that answered."""
        try:
            self._store_now()
        except Exception as e:
            self._store_error = e

    def _raise_store_error(self) -> None:
        error, self._store_error = self._store_error, None
        if error is not None:
            raise error

    def _store_now(self) -> None:
        self._raise_store_error()
        unstored, self._unstored = self._unstored, {}
        if unstored and self.cache is not None:
            self.cache.put_many(list(unstored.items()))

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._requests is None or self._loop is not loop:  # a semaphore belongs to one loop
            self._requests, self._loop = asyncio.Semaphore(self.concurrency), loop
            self.canary.bind()
            self._memory = self._bodies = None

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
        await self.budget.reserve(len(images) if self.charge_cached else len(missing))
        step = self.request_size(flat.shape[1])
        groups = [missing[i : i + step] for i in range(0, len(missing), step)]

        def keep(g: int, answer: Answer) -> None:  # cached as each request is answered
            for i, one in zip(groups[g], answer.one_by_one(), strict=True):
                found[i] = one
                self._store_soon(keys[i], one)
            if self.on_asked is not None:
                self.on_asked(len(groups[g]))

        if self.on_asked is not None and self.charge_cached and len(missing) < len(images):
            self.on_asked(len(images) - len(missing))

        try:
            await self._send([_rows(batch, g) for g in groups], keep)
        finally:
            self._store_now()
        self.sent += len(missing)
        self.cached += len(images) - len(missing)
        return Answer.stack([a for a in found if a is not None])

    async def _send(self, chunks: list[torch.Tensor], keep: Callable[[int, Answer], None]) -> None:
        """One request per chunk (at most `max_batch` images each); `keep(i, answer)` as each
        is answered, so what was paid for is kept even when a later request fails."""
        requests = self._requests
        assert requests is not None
        if not chunks:
            return
        if self._bodies is None:  # as many requests at once as REQUEST_BYTES holds
            values = chunks[0][0].numel()
            per_request = max(1.0, self.request_size(values) * self._wire_bytes(values))
            at_once = max(1, min(self.concurrency, int(scaled(REQUEST_BYTES) // per_request)))
            self._bodies = asyncio.Semaphore(at_once)
        bodies = self._bodies

        async def one(i: int, chunk: torch.Tensor) -> None:
            keep(i, await self._classify(chunk, requests, bodies))

        if len(chunks) == 1:
            await one(0, chunks[0])
            return
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels the rest
                for i, chunk in enumerate(chunks):
                    group.create_task(one(i, chunk))
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None

    async def _classify(
        self,
        chunk: torch.Tensor,
        requests: asyncio.Semaphore,
        bodies: asyncio.Semaphore | None,
    ) -> Answer:
        """The answers on `chunk`: one request, or, where the server refuses requests that
        large (HTTP 413), several of at most `_max_request` images, stacked back in order."""
        cap = self._max_request
        if cap is not None and len(chunk) > cap:
            size = cap
            parts: list[Answer | None] = [None] * math.ceil(len(chunk) / size)

            async def part(j: int) -> None:
                piece = chunk[j * size : (j + 1) * size]
                parts[j] = await self._classify(piece, requests, bodies)

            try:
                async with asyncio.TaskGroup() as group:
                    for j in range(len(parts)):
                        group.create_task(part(j))
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            return Answer.stack([p for p in parts if p is not None])
        try:
            async with requests, bodies or contextlib.nullcontext():
                count_sent(len(chunk))
                try:
                    answer = await self.blackbox.classify(chunk)
                except RequestTooLarge:
                    count_sent(-len(chunk))  # refused unread: nothing was answered
                    raise
        except RequestTooLarge as e:
            if len(chunk) == 1:
                raise e.one_image() from None
            self._refused = min(len(chunk), self._refused or len(chunk))
            self._max_request = max(1, min(self._max_request or len(chunk), len(chunk) // 2))
            return await self._classify(chunk, requests, bodies)
        if len(answer.labels) != len(chunk):  # adapters check this too; never miscount
            raise BBSmoothError(f"black box answered {len(answer.labels)} of {len(chunk)}")
        cap = self._max_request
        if cap is not None and len(chunk) >= cap and (self._told is None or cap < self._told):
            self._told = cap  # told once the smaller size is answered (again if it must shrink)
            warn(
                f"the server refused {self._refused}-image requests as too large (HTTP 413): "
                f"sending at most {cap} per request from now on (--batch {cap} skips the "
                "refusals)"
            )
        return answer


def _rows(batch: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """batch[rows]: a view where they follow each other (all of them, unless some were cached),
    so that asking about a whole data set does not copy it once more."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return batch[rows[0] : rows[-1] + 1]
    return batch[rows]
