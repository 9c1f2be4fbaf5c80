"""A planned noise block: the samples of one block of a region that a tally uses, what is
already answered of them (in the cache or this run's memory), and the requests still to send.
Each answered request of a block is cached at once as a "piece" of it (keyed by `piece_key`),
so that a block cut short by a fault or a kill keeps what was paid for."""

from __future__ import annotations

from dataclasses import dataclass, field

from .blackbox import Answer
from .cache import cache_key


@dataclass(frozen=True)
class Block:
    index: int
    need: int  # samples of this block the tally uses
    key: str
    answered: Answer | None  # what the cache already holds (a prefix of the block)
    # requests answered past the prefix, by first sample: a block cut short by a fault or a kill
    pieces: dict[int, Answer] = field(default_factory=dict)
    from_cache: bool = False  # `answered` was read from the disk cache (not this run's memory)

    @property
    def have(self) -> int:
        return 0 if self.answered is None else len(self.answered.labels)

    @property
    def in_pieces(self) -> int:
        return sum(len(p.labels) for p in self.pieces.values())

    @property
    def missing(self) -> int:
        return max(0, self.need - self.have - self.in_pieces)

    def gaps(self, step: int) -> list[tuple[int, int]]:
        """The sample ranges [start, stop) still to ask, in requests of at most `step`."""
        out, start = [], self.have
        starts = sorted(self.pieces)
        while start < self.need:
            if start in self.pieces:
                start += len(self.pieces[start].labels)
                continue
            next_piece = next((s for s in starts if s > start), self.need)
            stop = min(start + step, next_piece)
            out.append((start, stop))
            start = stop
        return out


def piece_key(block_key: str, start: int) -> str:
    return cache_key(block=block_key, piece=start)
