"""API keys: read from an environment variable, sent the way the vendor expects, and kept out
of everything we print, log, cache or save (the URL's query string is redacted, and the key's
value is scrubbed from any error text a server echoes back)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import UsageError

DEFAULT_ENV = "BBSMOOTH_API_KEY"
STYLES = "bearer, key (Authorization: Key …), header:NAME, query:NAME or none"


@dataclass(frozen=True)
class Auth:
    """`style`: bearer | key | header:NAME | query:NAME | none; the key is `os.environ[env]`."""

    style: str = "bearer"
    env: str = DEFAULT_ENV

    def __post_init__(self) -> None:
        kind, _, name = self.style.partition(":")
        if kind in ("bearer", "key", "none") and not name:
            return
        if kind in ("header", "query") and name.strip():
            return
        raise UsageError(f"--auth {self.style!r} is unknown: use {STYLES}")

    @property
    def key(self) -> str | None:
        return os.environ.get(self.env) or None if self.style != "none" else None

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


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
