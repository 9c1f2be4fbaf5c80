"""The HTTP edge both of our services stand on (`bbsmooth serve`, `bbsmooth proxy`): uvicorn on
a socket bound now, bounded against its clients.

Every client is assumed hostile. A connection must send a whole request head within
`client_timeout` of opening (or of its last answer), else it is closed; past
`max_connections`, the connection idle the longest is closed to admit a new one, so sockets
that send nothing cannot lock out a client that has a key (503 only when every connection is
in a request). A malformed request head is answered by one JSON line (400), as every other
refusal (connections.py bounds the connections).

The routes read bodies through `read_body` (a size cap, a deadline, Content-Length checked),
hold them in memory only with a slot of `holding`, and know clients by `ClientKeys`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .adapters.urls import is_loopback_name
from .connections import Connections, bounded_protocol, error_body
from .errors import UsageError
from .redaction import printable, redact

BODY_WAIT = 2.0  # seconds a request waits for a slot to hold its body (503 after)


class Refused(Exception):
    """A request answered with `status` and one line, before any work. A refusal that may
    leave the body unread (bad framing, too large, too slow, no key) closes the connection:
    what is left of the body must not be read as the next request."""

    CLOSING = (400, 401, 408, 411, 413, 415)

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})
        if status in self.CLOSING:
            self.headers["Connection"] = "close"


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    """A Starlette response carrying `error_body(message)`."""
    from starlette.responses import Response

    return Response(error_body(message), status, headers, media_type="application/json")


def error_handlers(server: str) -> dict[Any, Callable[..., Any]]:
    """The exception handlers both apps share: a refusal, Starlette's own HTTP errors (404,
    405), and anything unexpected (500, its details in the `server`'s log by `guarded`)."""
    from starlette.exceptions import HTTPException

    async def refused(_: Any, e: Exception) -> Any:
        assert isinstance(e, Refused)
        return error_response(e.status, str(e), e.headers)

    async def http_error(_: Any, e: Exception) -> Any:
        assert isinstance(e, HTTPException)
        return error_response(e.status_code, str(e.detail), e.headers)

    async def unexpected(_: Any, e: Exception) -> Any:
        return error_response(500, f"internal error ({type(e).__name__}): see the {server}'s log")

    return {Refused: refused, HTTPException: http_error, Exception: unexpected}


def resolves_to_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is on this machine only ("" means all
    interfaces); OSError (or UnicodeError, ValueError) when it names none."""
    host = host.strip("[]")
    if not host:
        return False
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return all(is_loopback_name(str(info[4][0])) for info in infos)


# -- reading a request ----------------------------------------------------------------------


async def read_body(
    request: Any, limit: int, timeout: float, *, length_required: bool = False
) -> bytes:
    """A Starlette request's whole body: at most `limit` bytes (413, refused unread when its
    Content-Length says so), arriving within `timeout` seconds (408: a slow drip). With
    `length_required`, a body must say its length (411: no Content-Length, or chunked)."""
    headers = request.headers
    if length_required and "transfer-encoding" in headers:
        raise Refused(411, "chunked bodies are not supported: send Content-Length")
    length = headers.get("content-length")
    if length is None:
        if length_required:
            raise Refused(411, f"{request.method} needs a Content-Length header")
    elif not (length.isascii() and length.isdigit()):
        raise Refused(400, "Content-Length must be a non-negative decimal integer")
    elif len(length.lstrip("0")) > 18 or int(length) > limit:
        raise Refused(413, f"a body of {length[:20]} bytes: at most {limit:,} ({limit} bytes)")

    async def read() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Refused(413, f"the body exceeds {limit:,} bytes ({limit} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        raise Refused(408, f"the body did not arrive within {timeout:g} s") from None


@contextlib.asynccontextmanager
async def holding(bodies: asyncio.Semaphore, wait: float = BODY_WAIT) -> AsyncIterator[None]:
    """A slot for one body in memory: a burst waits up to `wait` seconds, then 503."""
    try:
        await asyncio.wait_for(bodies.acquire(), wait)
    except TimeoutError:
        raise Refused(503, "too many request bodies in memory: try again",
                      {"Retry-After": "1"}) from None  # fmt: skip
    try:
        yield
    finally:
        bodies.release()


class ClientKeys:
    """API keys clients send as `Authorization: Bearer KEY` (or `X-API-Key: KEY`); none: every
    client is let in. Keys are held as SHA-256 digests, and every digest is compared in
    constant time, so neither which key matched nor a key's length shows in the timing."""

    def __init__(self, keys: list[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def name_of(self, headers: Any) -> str:
        """client-1, client-2, … by the key's place; 401 (Refused) without a valid key."""
        if not self._digests:
            return "anonymous"
        given = headers.get("x-api-key") or ""
        values = headers.getlist("authorization")
        if len(values) > 1:
            given = ""
        elif values:
            scheme, _, token = values[0].strip().partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        # Headers arrive decoded as Latin-1: encoding back gives the bytes that were sent.
        digest = hashlib.sha256(given.encode("latin-1", "replace")).digest()
        found = None
        for i, key in enumerate(self._digests):  # every key compared: the time tells nothing
            if hmac.compare_digest(digest, key):
                found = f"client-{i + 1}"
        if found is None or not given:
            # Never echo what the client sent: it may be a near-miss of a key.
            raise Refused(401, "a valid API key is needed: Authorization: Bearer KEY",
                          {"WWW-Authenticate": "Bearer"})  # fmt: skip
        return found


def guarded(app: Any, log: Callable[[str], None]) -> Any:
    """`app`, with whatever it raises answered by one JSON line (500) and logged in one
    redacted line: uvicorn would print a traceback, unredacted, and Starlette re-raises after
    its own error handler has answered."""

    async def run(scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, sending)
        except Exception as e:
            where = f"{scope.get('method', '')} {str(scope.get('path', ''))[:100]}".strip()
            log(printable(redact(f"internal error on {where}: {type(e).__name__}: {e}"), 1000))
            if scope["type"] == "http" and not started:
                body = error_body(f"internal error ({type(e).__name__}): see the server's log")
                headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})

    return run


# -- the server -----------------------------------------------------------------------------


class HttpServer:
    """`app` on a socket bound now (so a port of 0 is known before the first request), run by
    uvicorn: in the foreground (`run`: SIGTERM and Ctrl-C drain the requests in flight for up
    to `shutdown_grace` seconds) or in a background thread (`start`/`stop`, or `in_thread`)."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        client_timeout: float = 30.0,
        max_connections: int = 1024,
        tls_key: Path | None = None,
        tls_cert: Path | None = None,
        shutdown_grace: float = 30.0,
    ) -> None:
        import uvicorn

        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.port: int = self.socket.getsockname()[1]
        tls = tls_cert is not None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{shown}:{self.port}"
        self.connections = Connections(max_connections)
        config = uvicorn.Config(
            app,
            http=bounded_protocol(client_timeout, self.connections),
            log_level="warning",
            access_log=False,  # a client's key may sit in a query string: nothing logged
            timeout_graceful_shutdown=max(1, round(shutdown_grace)),
            timeout_keep_alive=5,
            # no limit_concurrency: uvicorn counts idle connections in it, so a few hundred
            # sockets that never send a request would lock every client out (503); idle
            # connections are evicted instead, and memory is bounded per body
            ssl_keyfile=str(tls_key) if tls else None,
            ssl_certfile=str(tls_cert) if tls else None,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        # A hostile client's garbled request is answered (400), not worth a line in the log.
        logging.getLogger("uvicorn.error").addFilter(_quiet_on_bad_requests)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (which drain the requests in flight)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self) -> HttpServer:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.socket.close()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[HttpServer]:
        """Serve in a background thread while the block runs (tests, benchmarks)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()


def _quiet_on_bad_requests(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Invalid HTTP request received."
