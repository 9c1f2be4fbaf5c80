"""API keys: read from an environment variable once, checked, sent the way the vendor expects,
and kept out of everything we print, log, cache or save (the key is registered with
`redaction`, which scrubs it and its encoded forms from every message)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import UsageError
from ..options import EndpointOptions, default_of
from ..redaction import printable, remember

DEFAULT_ENV = default_of(EndpointOptions, "api_key_env")
STYLES = "bearer, key (Authorization: Key …), header:NAME, query:NAME or none"


@dataclass(frozen=True)
class Auth:
    """`style`: bearer | key | header:NAME | query:NAME | none; the key is `os.environ[env]`."""

    style: str = "bearer"
    env: str = DEFAULT_ENV
    _key: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_auth_style(self.style, "--auth")
        if self.style != "none":
            object.__setattr__(self, "_key", read_key(self.env))

    @property
    def key(self) -> str | None:
        return self._key

    def describe(self) -> str:
        """For the fingerprint and messages: how the key travels, never the key."""
        return self.style

    def apply(self, url: str, headers: dict[str, str]) -> str:
        """Add the key (if the variable is set) to `headers` in place; return the URL to use."""
        key = self.key
        if key is None:
            return url
        kind, _, name = self.style.partition(":")
        if kind == "bearer":
            headers["authorization"] = f"Bearer {key}"
        elif kind == "key":
            headers["authorization"] = f"Key {key}"
        elif kind == "header":
            headers[name] = key
        else:
            parts = urlsplit(url)
            query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
            return urlunsplit(parts._replace(query=urlencode([*query, (name, key)])))
        return url

    def hint(self) -> str:
        if self.style == "none":
            return "the endpoint wants credentials: pick --auth (bearer, header:NAME, query:NAME)"
        if self.key is None:
            return f"set ${self.env} to your API key (or name another variable with --api-key-env)"
        return f"check the key in ${self.env} and --auth {self.style}"


def read_key(env: str) -> str | None:
    """The key in `$env` (None when unset or empty), checked once at start-up: a value with
    whitespace or control characters (a CRLF .env file) would break the request line and be
    echoed in the client's own error, so it is refused, naming the variable, never the value."""
    value = os.environ.get(env) or None
    if value is not None and not re.fullmatch(r"[\x21-\x7e]+", value):
        raise UsageError(
            f"${env} holds whitespace, control or non-ASCII characters (a Windows line ending "
            "from a .env file?): set it to the key alone"
        )
    remember(value)
    return value


# Headers the transport itself sets, or that route or frame the request: never a key's place.
RESERVED_HEADERS = {
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding",
    "connection", "keep-alive", "upgrade", "te", "trailer", "expect", "cookie", "accept-encoding",
}  # fmt: skip
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def check_auth_style(style: str, where: str) -> None:
    """bearer | key | none, or header:NAME with NAME a header we may set, or query:NAME with
    NAME a plain query parameter name; else one UsageError line."""
    kind, sep, name = style.partition(":")
    if kind in ("bearer", "key", "none") and not sep:
        return
    if kind == "header" and name:
        check_header_name(name, where)
        return
    if kind == "query" and re.fullmatch(r"[A-Za-z0-9_.~-]+", name):
        return
    raise UsageError(f"{where} {printable(style, 60)!r} is unknown: use {STYLES}")


def check_header_name(name: str, where: str) -> None:
    """A header name we may set: an HTTP token, not one the transport or routing owns."""
    if not _TOKEN.fullmatch(name):
        raise UsageError(f"{where}: {printable(name, 60)!r} is not a valid HTTP header name")
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith("proxy-"):
        raise UsageError(f"{where}: the {name} header is not bbsmooth's to set: name another")
