"""The errors a user can meet, each with the exit code the CLI gives it.

Messages are one line: what went wrong and what to do about it.
"""

from __future__ import annotations

import sys

from .redaction import printable, redact


class BBSmoothError(Exception):
    """Base class; `exit_code` is what `bbsmooth` exits with."""

    exit_code = 1


class UsageError(BBSmoothError):
    """Bad input or usage: a missing file, an unknown endpoint scheme, σ ≤ 0, …"""

    exit_code = 2


class StaleRun(UsageError):
    """`--resume` on a run made with other settings (the demo redoes its own)."""


class EndpointError(BBSmoothError):
    """The classifier could not be reached or answered wrongly, even after retries."""

    exit_code = 3


class ProtocolError(EndpointError):
    """The classifier answered, but not in the shape its protocol promises."""


class RequestTooLarge(EndpointError):
    """The server refused a request for its size (HTTP 413) without answering it: never retried
    as is; votes.py splits the request, and raises this with a one-line message of its own
    (`one_image`) when even one image is too large. `detail` is the server's redacted text."""

    def __init__(self, message: str, where: str = "", detail: str = "", sent: int = 0) -> None:
        super().__init__(message)
        self.where, self.detail, self.sent = where, detail, sent

    def one_image(self) -> RequestTooLarge:
        said = f": {self.detail}" if self.detail else ""
        size = f" of {self.sent:,} bytes" if self.sent else ""
        return RequestTooLarge(
            f"{self.where} refused a request{size} holding a single image as too large "
            f"(HTTP 413{said}): raise the server's request body limit (bbsmooth serve: "
            "--max-request-bytes), or send smaller images (--size HxW)",
            self.where,
            self.detail,
            self.sent,
        )


class BudgetExhausted(BBSmoothError):
    """Sending more queries would exceed `--max-queries`; answered blocks stay cached."""

    exit_code = 4


class Terminated(BBSmoothError):
    """SIGTERM reached a run that stops what it started before it exits (evaluate --ray)."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process the signal ended


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real error inside a (possibly nested) exception group from a TaskGroup: the
    one the user should read."""
    exc = group.exceptions[0]
    return first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc


def warn(message: str) -> None:
    """One warning line on stderr, redacted and printable like every message."""
    print(f"bbsmooth: warning: {printable(redact(message), 1000)}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """One informational line on stderr (what a run did that the results do not show)."""
    print(f"bbsmooth: {printable(redact(message), 1000)}", file=sys.stderr, flush=True)
