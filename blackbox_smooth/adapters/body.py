"""An answer's body read within a bound: gzip and deflate decoded here, in bounded steps."""

from __future__ import annotations

import zlib

from ..errors import ProtocolError
from ..redaction import server_text
from .retry import FatalStatus


class BoundedBody:
    """Collects an answer's bytes, decoding gzip/deflate in bounded steps, refusing to hold
    more than `limit` decoded bytes (a compressed bomb is stopped after `limit`, not after it
    has been inflated)."""

    def __init__(self, encoding: str, limit: int, where: str) -> None:
        self.limit, self.where = limit, where
        self.parts: list[bytes] = []
        self.size = 0
        coding = encoding.strip().lower()
        if coding in ("", "identity"):
            self.inflate = None
        elif coding in ("gzip", "x-gzip", "deflate"):
            self.inflate = zlib.decompressobj(47 if coding != "deflate" else 15)
        else:
            raise FatalStatus(
                f"{where} answered with content-encoding {server_text(encoding, 40)!r}, which "
                "bbsmooth does not accept (it asks for gzip or deflate)"
            )

    def feed(self, chunk: bytes) -> None:
        if self.inflate is None:
            self._add(chunk)
            return
        try:
            while chunk:
                self._add(self.inflate.decompress(chunk, self.limit - self.size + 1))
                chunk = self.inflate.unconsumed_tail
        except zlib.error as e:
            raise ProtocolError(f"{self.where}: the answer's compression is damaged") from e

    def content(self) -> bytes:
        if self.inflate is not None:
            self._add(self.inflate.flush())
        return b"".join(self.parts)

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise FatalStatus(
                f"{self.where} answered more than {self.limit:,} bytes (decompressed): raise "
                "--max-response-bytes if this endpoint's answers are really that large"
            )
        self.parts.append(data)
