"""Shared asynchronous HTTP for the wire adapters: pooled keep-alive connections, a rate limit,
and retries (tenacity) on connect errors, timeouts, 429 (honouring Retry-After), 5xx and
malformed answers. A retried request carries the same images: a failed query is never dropped
and never counted as a vote (DESIGN.md rule 4).
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from ..errors import BBSmoothError, EndpointError, ProtocolError
from .auth import Auth, scrub

T = TypeVar("T")

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
CONNECTIONS_PER_CLIENT = 4


def redact(url: str) -> str:
    """The URL without credentials or query string (where API keys travel)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # tries per request, the first included
    backoff: float = 0.25  # seconds; exponential with full jitter
    max_backoff: float = 20.0
    max_retry_after: float = 120.0  # a server asking for longer than this is an outage


class RetryableStatus(EndpointError):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalStatus(EndpointError):
    """4xx other than 408/425/429: the request itself is wrong; retrying cannot help."""


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TransportError | RetryableStatus | ProtocolError)


class RateLimit:
    """At most `rps` request starts per second, spaced evenly."""

    def __init__(self, rps: float | None) -> None:
        self.interval = 1.0 / rps if rps else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class HttpTransport:
    """One pooled client per endpoint; `post_json` returns the parsed answer or raises
    EndpointError naming the request, after the retries are spent."""

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
    ) -> None:
        # httpx's pool slows down sharply with many connections in one client (measured here:
        # 64 connections in one AsyncClient gave ~130 requests/s, 16 clients of 4 gave ~1,200),
        # so connections are spread over small clients and each request takes the least busy.
        shards = max(1, math.ceil(concurrency / CONNECTIONS_PER_CLIENT))
        per_client = math.ceil(concurrency / shards)
        limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
        tls = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        if tls is True:
            tls = ssl.create_default_context()  # one context for all clients: loading CAs is slow
        self._client_options = {
            "timeout": httpx.Timeout(timeout),
            "limits": limits,
            "headers": headers,
            "verify": tls,
        }
        self._shards = shards
        self.clients: list[httpx.AsyncClient] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = [0] * shards
        self.retry = retry or RetryPolicy()
        self.rate = RateLimit(rps)
        self.retries = 0
        self.auth = auth or Auth("none")
        self.secrets = tuple(s for s in (self.auth.key,) if s)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableStatus) and exc.retry_after is not None:
            return exc.retry_after
        jitter = wait_random_exponential(multiplier=self.retry.backoff, max=self.retry.max_backoff)
        return jitter(state)

    def _before_sleep(self, state: RetryCallState) -> None:
        self.retries += 1

    def get_json_sync(self, url: str) -> Any:
        """GET a small JSON document (model metadata) before any event loop runs; {} when the
        server has none to give (404, not JSON)."""
        where = f"GET {redact(url)}"
        headers: dict[str, str] = {}
        url = self.auth.apply(url, headers)
        options = {k: v for k, v in self._client_options.items() if k != "limits"}
        with httpx.Client(**options) as client:
            for attempt in range(3):
                try:
                    response = client.get(url, headers=headers)
                    break
                except httpx.TransportError as e:
                    if attempt == 2:
                        message = f"{where} failed: {type(e).__name__} (is the server up?)"
                        raise EndpointError(scrub(message, self.secrets)) from e
                    time.sleep(0.5 * (attempt + 1))
        if response.status_code in (401, 403):
            raise FatalStatus(f"{where} answered HTTP {response.status_code} ({self.auth.hint()})")
        try:
            return read_json(response) if response.status_code < 400 else {}
        except ProtocolError:
            return {}

    async def post_json(self, url: str, body: Any, parse: Callable[[Any], T]) -> T:
        """POST `body` as JSON and `parse` the JSON answer; both retried as one unit, so a
        malformed or truncated answer is asked again."""
        # orjson writes numpy arrays directly and float32 at its shortest: ~25× faster than json
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        return await self.post(url, payload, "application/json", lambda r: parse(read_json(r)))

    async def post_file(
        self, url: str, content: bytes, content_type: str, parse: Callable[[Any], T]
    ) -> T:
        """POST a file (an encoded image) and `parse` the JSON answer."""
        return await self.post(url, content, content_type, lambda r: parse(read_json(r)))

    async def post(
        self, url: str, content: bytes, content_type: str, parse: Callable[[httpx.Response], T]
    ) -> T:
        """One request, retried as a unit with its parsing; errors name the request and never
        hold the API key."""
        try:
            return await self._post(url, content, content_type, parse)
        except BBSmoothError as e:  # a server may echo the key in its error text
            if self.secrets:
                e.args = (scrub(str(e), self.secrets),)
            raise

    async def _post(
        self, url: str, content: bytes, content_type: str, parse: Callable[[httpx.Response], T]
    ) -> T:
        where = f"POST {redact(url)}"
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.rate.wait()
                    response = await self._post_once(url, content, content_type)
                    self._check(response, where)
                    return parse(response)
        except FatalStatus:
            raise
        except RetryableStatus as e:
            raise EndpointError(f"{e} (gave up after {self.retry.attempts} attempts)") from e
        except ProtocolError as e:
            raise ProtocolError(
                f"{where}: {e} (gave up after {self.retry.attempts} attempts)"
            ) from e
        except httpx.TransportError as e:
            kind = type(e).__name__
            raise EndpointError(
                f"{where} failed: {kind}{': ' + str(e) if str(e) else ''} "
                f"(gave up after {self.retry.attempts} attempts; is the server up?)"
            ) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _bind_loop(self) -> None:
        # Connections belong to the event loop that opened them: a transport used from a new
        # loop (a script calling asyncio.run twice) gets fresh clients.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self.clients = [httpx.AsyncClient(**self._client_options) for _ in range(self._shards)]
            self._loop = loop

    async def _post_once(self, url: str, content: bytes, content_type: str) -> httpx.Response:
        self._bind_loop()
        headers = {"content-type": content_type}
        url = self.auth.apply(url, headers)
        shard = self._busy.index(min(self._busy))
        self._busy[shard] += 1
        try:
            return await self.clients[shard].post(url, content=content, headers=headers)
        finally:
            self._busy[shard] -= 1

    def _check(self, response: httpx.Response, where: str) -> None:
        status = response.status_code
        if status < 400:
            return
        # scrubbed before it is cut short, or a cut could leave part of a key behind
        snippet = " ".join(scrub(response.text, self.secrets)[:200].split())
        message = f"{where} answered HTTP {status}{': ' + snippet if snippet else ''}"
        if status in RETRY_STATUS or status >= 500:
            after = _retry_after(response.headers.get("retry-after"))
            if after is not None and after > self.retry.max_retry_after:
                raise FatalStatus(f"{message} (Retry-After {after:.0f}s: try again later)")
            raise RetryableStatus(message, after)
        if status in (401, 403) or re.search(r"\b(api[ _-]?key|token|credential)", snippet, re.I):
            message += f" ({self.auth.hint()})"
        raise FatalStatus(message)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def read_json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as e:
        raise ProtocolError("answer is not valid JSON") from e
