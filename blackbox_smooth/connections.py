"""The HTTP edge's connections (httpserver.py): uvicorn's HTTP/1.1 protocol (h11), bounded
against hostile clients: a deadline on each request's head, a cap on connections that evicts
the idle before refusing the busy, JSON for a malformed head, and a linger after a refusal.
uvicorn times nothing before a first request, so sockets that never send one would otherwise
stay open until the process runs out of files. A refusal sent while the client is still
sending its body stops writing, then drops what keeps arriving for a moment before closing:
closing at once would reset the connection, and the reset can destroy the answer before the
client reads it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .redaction import printable, redact

LINGER_SECONDS, LINGER_BYTES = 2.0, 256 * 2**20  # what a refused client may still send
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"


def error_body(message: str) -> bytes:
    """The JSON of every error: one line, redacted of every key, printable, short."""
    import orjson

    return orjson.dumps({"error": printable(redact(" ".join(str(message).split())), 500)})


@dataclass
class Connections:
    """What the server's clients hold: connections open now, the most at once, and those
    closed to admit another (evicted, idle) or refused (503, all busy)."""

    limit: int
    open: int = 0
    peak: int = 0
    evicted: int = 0
    refused: int = 0
    live: dict[Any, None] = field(default_factory=dict, repr=False)  # in order of opening

    def evict_one(self) -> bool:
        """Close the connection idle the longest, to admit another; False when all are busy."""
        idle = [p for p in self.live if p.idle() and not p.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda p: p._idle_since)
        oldest.transport.close()
        self.live.pop(oldest, None)  # its slot is free now, before it is lost
        self.evicted += 1
        return True


class BoundedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11), one per connection, bounded by its server's
    `bounds` and `head_seconds` (set by `bounded_protocol`)."""

    bounds: Connections
    head_seconds: float
    _lingering = False
    _dropped = 0

    def connection_made(self, transport: Any) -> None:
        self._idle_since = time.monotonic()
        if len(self.bounds.live) >= self.bounds.limit and not self.bounds.evict_one():
            self.bounds.refused += 1
            body = error_body("too many connections: try again later")
            transport.write(_BUSY + b"content-length: %d\r\nretry-after: 1\r\n"
                            b"connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            transport.close()
            self.transport = transport
            self._refused = True
            return
        self._refused = False
        self.bounds.live[self] = None
        self.bounds.open = len(self.bounds.live)
        self.bounds.peak = max(self.bounds.peak, self.bounds.open)
        super().connection_made(_Lingering(transport, self))  # type: ignore[arg-type]
        self._arm()

    def idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_seconds, self._late, self.cycle)

    def _late(self, cycle_then: Any) -> None:
        if self.cycle is cycle_then and not self.transport.is_closing():
            self.transport.close()  # no new request began since the timer was set

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._lingering:  # a refused body still arriving: dropped, within bounds
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.abort()
            return
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.cycle is not None:
            # The connection, for the one fault a route cannot answer: hanging up
            # (tests/faults.py). The request's task has not started yet: it sees this.
            scope: dict[str, Any] = self.cycle.scope  # type: ignore[assignment]
            scope.setdefault("extensions", {})["bbsmooth.transport"] = self.transport

    def send_400_response(self, msg: str) -> None:
        # A request head h11 cannot read (a bad Content-Length, a garbled request line):
        # one JSON line like every other refusal, naming what was wrong.
        import h11

        why = sys.exc_info()[1]
        text = f"malformed request: {why}" if isinstance(why, h11.RemoteProtocolError) else msg
        body = error_body(text)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = time.monotonic()
        if not self.transport.is_closing():
            self._head_timer.cancel()
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.bounds.live.pop(self, None)
        self.bounds.open = len(self.bounds.live)
        self._head_timer.cancel()
        super().connection_lost(exc)


def bounded_protocol(seconds: float, bounds: Connections) -> type[BoundedProtocol]:
    """The protocol class uvicorn builds for each connection of one server: a request head
    due within `seconds`, the connections counted and capped in `bounds`."""
    return type("Bounded", (BoundedProtocol,), {"head_seconds": seconds, "bounds": bounds})


class _Lingering:
    """The connection's transport, whose `close` lingers when the client may still be sending
    (a request refused before its body was read): stop writing, drop what arrives for at most
    LINGER_SECONDS, then close."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return bool(self._protocol._lingering or self._transport.is_closing())

    def close(self) -> None:
        protocol, transport = self._protocol, self._transport
        unread = protocol.conn.their_state is h11.SEND_BODY
        if not unread or protocol._lingering or transport.is_closing():
            transport.close()
            return
        protocol._lingering = True
        with contextlib.suppress(OSError, RuntimeError):
            transport.write_eof()
        protocol.flow.resume_reading()
        protocol.loop.call_later(LINGER_SECONDS, transport.close)
