"""When a request is tried again: the policy (attempts, back-off), the statuses and errors that
are worth another try, and the server's Retry-After."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import httpx

from ..errors import EndpointError, ProtocolError
from ..options import EndpointOptions, default_of

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = default_of(EndpointOptions, "retries")  # tries, the first included
    backoff: float = default_of(EndpointOptions, "backoff")  # s; exponential, full jitter
    max_backoff: float = default_of(EndpointOptions, "max_backoff")
    max_retry_after: float = 120.0  # a server asking for longer than this is an outage


class RetryableStatus(EndpointError):
    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalStatus(EndpointError):
    """4xx other than 408/425/429, a redirect, an answer too large: retrying cannot help."""


class Deadline(EndpointError):
    """The whole request took longer than `--timeout` (retried like any timeout)."""


def retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) or seconds > 0 else None
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError, IndexError):
            return None


def is_retryable(exc: BaseException) -> bool:
    # A LocalProtocolError is ours (a header we cannot send), not the server's: never retried.
    if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
        return False
    return isinstance(exc, httpx.TransportError | RetryableStatus | ProtocolError | Deadline)
