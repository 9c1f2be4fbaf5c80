"""Shared asynchronous HTTP for the wire adapters: pooled keep-alive connections, a rate limit,
and retries (tenacity) on connect errors, timeouts, 429 (honouring Retry-After), 5xx and
malformed answers. A retried request carries the same images: a failed query is never dropped
and never counted as a vote.

The server on the other end may be hostile, so what it can make us hold or wait for is bounded:
`timeout` is a deadline for the whole request (connect, headers and body), an answer may hold at
most `max_response_bytes` bytes after decompression (gzip and deflate are decoded in bounded
steps, body.py), redirects are errors that name their target, and every piece of server text
in a message is redacted of the key and made printable first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ..errors import BBSmoothError, EndpointError, ProtocolError, RequestTooLarge, UsageError
from ..options import EndpointOptions, default_of
from ..redaction import redact as redact_secrets
from ..redaction import redact_url, server_text
from .auth import Auth
from .body import BoundedBody
from .retry import (
    RETRY_STATUS,
    Deadline,
    FatalStatus,
    RetryableStatus,
    RetryPolicy,
    is_retryable,
    retry_after,
)

T = TypeVar("T")

CONNECTIONS_PER_CLIENT = 4
MAX_RESPONSE_BYTES = default_of(EndpointOptions, "max_response_bytes")  # decompressed
_CHUNK = 1 << 16
# Large bodies go out a piece at a time, each written once the socket has taken the last: given
# whole, asyncio keeps its own copy of what the socket has not taken yet (up to the whole body).
_BODY_PIECE = 1 << 20


async def _pieces(content: bytes) -> AsyncIterator[bytes]:
    view = memoryview(content)
    for start in range(0, len(view), _BODY_PIECE):
        yield view[start : start + _BODY_PIECE]  # type: ignore[misc]  # h11 sends any buffer


@dataclass(frozen=True)
class Reply:
    """One answer, read whole (and bounded) before anything parses it."""

    status: int
    headers: httpx.Headers
    content: bytes


class RateLimit:
    """At most `rps` request starts per second, spaced evenly."""

    def __init__(self, rps: float | None) -> None:
        self.interval = 1.0 / rps if rps else 0.0
        self._next = 0.0

    def delay(self) -> float:
        """Seconds until the next start may go, that start booked (no await between reading
        and booking, so one event loop needs no lock; cluster.py's coordinator books here)."""
        now = time.monotonic()
        wait = self._next - now
        self._next = max(now, self._next) + self.interval
        return max(0.0, wait)

    async def wait(self) -> None:
        if not self.interval:
            return
        delay = self.delay()
        if delay > 0:
            await asyncio.sleep(delay)


class HttpTransport:
    """One pooled client per endpoint; `post_json` returns the parsed answer or raises
    EndpointError naming the request, after the retries are spent.

    `httpx_transport` (an `httpx.MockTransport`, an `httpx.ASGITransport`, …) replaces the
    sockets: the tests speak to a protocol in process. Everything above the sockets applies
    as it does to a server: the deadline, retries, the byte bound, redaction, and the
    concurrency (a semaphore stands in for the connection pool's limit)."""

    def __init__(
        self,
        *,
        concurrency: int = 16,
        timeout: float = 60.0,
        rps: float | None = None,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        verify: bool | str = True,
        auth: Auth | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        httpx_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # httpx's pool slows down sharply with many connections in one client (measured here:
        # 64 connections in one AsyncClient gave ~130 requests/s, 16 clients of 4 gave ~1,200),
        # so connections are spread over small clients and each request takes the least busy.
        shards = max(1, math.ceil(concurrency / CONNECTIONS_PER_CLIENT))
        per_client = math.ceil(concurrency / shards)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        self._client_options: dict[str, Any] = {
            "timeout": httpx.Timeout(timeout),
            "limits": limits,
            "verify": _tls(verify),
        }
        if httpx_transport is not None:
            self._client_options["transport"] = _Borrowed(httpx_transport)
        self._injected = httpx_transport is not None
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        # fixed headers (a vendor config's); ours (content type, key) are set per request
        self.headers = {"accept-encoding": "gzip, deflate", **(headers or {})}
        self._shards = shards
        self.clients: list[httpx.AsyncClient] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = [0] * shards
        self.retry = retry or RetryPolicy()
        self.rate = RateLimit(rps)
        self.retries = 0
        self.auth = auth or Auth("none")

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableStatus) and exc.retry_after is not None:
            return exc.retry_after
        jitter = wait_random_exponential(multiplier=self.retry.backoff, max=self.retry.max_backoff)
        return jitter(state)

    def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1

    def get_json_sync(self, url: str, required: bool = True) -> Any:
        """GET a small JSON document (model metadata) before the run's event loop starts; {}
        when the server has none to give (404, not JSON), or, unless `required`, when it cannot
        be reached (what only improves the requests, such as the server's extensions). Runs its
        own loop in a worker thread, so it works whether or not the caller is inside one."""
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                return pool.submit(asyncio.run, self._get_json(url)).result()
            except EndpointError:
                if required:
                    raise
                return {}

    async def _get_json(self, url: str) -> Any:
        where = f"GET {redact_url(url)}"
        options = {k: v for k, v in self._client_options.items() if k != "limits"}
        async with httpx.AsyncClient(**options) as client:
            reply = await self._retrying(
                lambda: self._send(client, "GET", url, None, None, where), where, attempts=3
            )
        if 300 <= reply.status < 400 or reply.status in (401, 403):
            self._check(reply, url, where)
        try:
            return parse_json_body(reply.content) if reply.status < 400 else {}
        except ProtocolError:
            return {}

    async def post_json(self, url: str, body: Any, parse: Callable[[Any], T]) -> T:
        """POST `body` as JSON and `parse` the JSON answer; both retried as one unit, so a
        malformed or truncated answer is asked again."""
        # orjson writes numpy arrays directly and float32 at its shortest: ~25× faster than json
        payload = await asyncio.to_thread(orjson.dumps, body, option=orjson.OPT_SERIALIZE_NUMPY)
        return await self.post_file(url, payload, "application/json", parse)

    async def post_file(
        self, url: str, content: bytes, content_type: str, parse: Callable[[Any], T]
    ) -> T:
        """POST a file (an encoded image) and `parse` the JSON answer."""
        return await self.post(url, content, content_type, lambda b: parse(parse_json_body(b)))

    async def post(
        self, url: str, content: bytes, content_type: str, parse: Callable[[bytes], T]
    ) -> T:
        """One request, retried as a unit with its parsing; errors name the request and never
        hold the API key."""
        return await self.post_reply(url, content, content_type, lambda r: parse(r.content))

    async def post_reply(
        self,
        url: str,
        content: bytes,
        content_type: str,
        parse: Callable[[Reply], T],
        headers: dict[str, str] | None = None,
    ) -> T:
        """`post` for protocols that read the answer's headers too (and send their own)."""
        where = f"POST {redact_url(url)}"

        async def once() -> T:
            await self.rate.wait()
            self._bind_loop()
            shard = self._busy.index(min(self._busy))
            self._busy[shard] += 1
            try:
                async with self._slots or contextlib.nullcontext():
                    reply = await self._send(self.clients[shard], "POST", url, content,
                                             content_type, where, headers)  # fmt: skip
            finally:
                self._busy[shard] -= 1
            self._check(reply, url, where, sent=len(content))
            return parse(reply)

        return await self._retrying(once, where, sent=len(content))

    async def _retrying(
        self,
        once: Callable[[], Awaitable[T]],
        where: str,
        attempts: int | None = None,
        sent: int = 0,
    ) -> T:
        attempts = attempts or self.retry.attempts
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        gave_up = f"gave up after {attempts} attempts"
        try:
            async for attempt in retrying:
                with attempt:
                    return await once()
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
            raise UsageError(
                f"{where} could not be sent: {type(e).__name__}: {server_text(str(e))} (check "
                "the URL, --auth and the key's variable)"
            ) from None
        except (FatalStatus, RequestTooLarge) as e:
            raise _redacted(e) from None
        except (RetryableStatus, Deadline) as e:
            raise _redacted(EndpointError(f"{e} ({gave_up})")) from None
        except ProtocolError as e:
            raise _redacted(ProtocolError(f"{where}: {e} ({gave_up})")) from None
        except httpx.TransportError as e:
            detail = f": {server_text(str(e))}" if str(e) else ""
            hint = "is the server up?"
            if sent > _BODY_PIECE:  # a server that refuses a large body often just hangs up
                hint = (
                    f"is the server up? does it take {sent:,}-byte requests? if not, lower --batch"
                )
            raise EndpointError(
                f"{where} failed: {type(e).__name__}{detail} ({gave_up}; {hint})"
            ) from None
        except BBSmoothError as e:  # a parser's verdict (a usage error, a vendor's status)
            raise _redacted(e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _bind_loop(self) -> None:
        # Connections belong to the event loop that opened them: a transport used from a new
        # loop (a script calling asyncio.run twice) gets fresh clients.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.clients = [httpx.AsyncClient(**self._client_options) for _ in range(self._shards)]
            # an injected transport has no pool to bound the requests in flight
            self._slots = asyncio.Semaphore(self.concurrency) if self._injected else None
            self._loop = loop

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        content: bytes | None,
        content_type: str | None,
        where: str,
        extra: dict[str, str] | None = None,
    ) -> Reply:
        """One attempt, headers and body within `timeout` seconds, at most
        `max_response_bytes` of answer."""
        headers = {**self.headers, **(extra or {})}
        if content_type:
            headers["content-type"] = content_type
        url = self.auth.apply(url, headers)
        try:
            async with asyncio.timeout(self.timeout):
                payload: bytes | AsyncIterator[bytes] | None = content
                if content is not None and len(content) > _BODY_PIECE:
                    headers["content-length"] = str(len(content))
                    payload = _pieces(content)
                request = client.build_request(method, url, content=payload, headers=headers)
                response = await client.send(request, stream=True)
                try:
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > self.max_response_bytes:
                        raise FatalStatus(
                            f"{where} announced {int(declared):,} bytes, over the limit of "
                            f"{self.max_response_bytes:,}: raise --max-response-bytes if this "
                            "endpoint's answers are really that large"
                        )
                    body = BoundedBody(response.headers.get("content-encoding", ""),
                                 self.max_response_bytes, where)  # fmt: skip
                    async for chunk in response.aiter_raw(_CHUNK):
                        body.feed(chunk)
                    return Reply(response.status_code, response.headers, body.content())
                finally:
                    await response.aclose()
        except TimeoutError:
            raise Deadline(f"{where} took longer than --timeout {self.timeout:g}s") from None

    def _check(self, reply: Reply, url: str, where: str, sent: int = 0) -> None:
        status = reply.status
        if 200 <= status < 300:
            return
        if 300 <= status < 400:
            location = reply.headers.get("location")
            target = "an address it did not give"
            if location:
                target = server_text(redact_url(urljoin(url, location)))
            raise FatalStatus(
                f"{where} answered HTTP {status}, a redirect to {target}: bbsmooth does not "
                "follow redirects; if you trust that address, use it as --endpoint"
            )
        snippet = server_text(reply.content)  # redacted before it is shortened
        message = f"{where} answered HTTP {status}{': ' + snippet if snippet else ''}"
        if status == 413:  # refused unanswered for its size: votes.py splits the request
            message += " (fewer images per request: lower --batch)"
            raise RequestTooLarge(message, where, snippet, sent)
        if status in (400, 422) and re.search(r"batch", snippet, re.I):
            message += " (fewer images per request: lower --batch)"
        if status in RETRY_STATUS or status >= 500 or status < 200:
            after = retry_after(reply.headers.get("retry-after"))
            if after is not None and after > self.retry.max_retry_after:
                raise FatalStatus(f"{message} (Retry-After {after:.0f}s: try again later)")
            raise RetryableStatus(message, after)
        if status in (401, 403) or re.search(r"\b(api[ _-]?key|token|credential)", snippet, re.I):
            message += f" ({self.auth.hint()})"
        raise FatalStatus(message)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


class _Borrowed(httpx.AsyncBaseTransport):
    """An injected transport is its caller's: the clients that use it never close it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        answer = await self.inner.handle_async_request(request)
        # a Response made from bytes (a MockTransport's) counts as read already: the same
        # stream in a fresh Response is read in bounded pieces, as a socket's is
        return httpx.Response(
            answer.status_code,
            headers=answer.headers,
            stream=answer.stream,
            extensions=answer.extensions,
        )

    async def aclose(self) -> None:
        return None


def _tls(verify: bool | str) -> ssl.SSLContext | bool:
    """One context for all clients (loading CAs is slow); a private CA bundle must be PEM."""
    if verify is False:
        return False
    try:
        return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    except (ssl.SSLError, ValueError) as e:
        raise UsageError(
            f"--ca-bundle {verify} holds no PEM certificates ({type(e).__name__}): give the CA "
            "certificate as a PEM file"
        ) from None
    except OSError as e:
        raise UsageError(f"--ca-bundle {verify} cannot be read: {e.strerror}") from None


def _redacted(error: BBSmoothError) -> BBSmoothError:
    """The same error with its text redacted (a server may echo the key anywhere in it)."""
    error.args = (redact_secrets(str(error)),)
    return error


def parse_json_body(content: bytes) -> Any:
    """An answer's bytes as JSON; a ProtocolError (retried) when they are not."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as e:
        raise ProtocolError("answer is not valid JSON") from e
