"""Keeping secrets and hostile server text out of what we print, log, cache or save.

Every message that holds text a server chose (error bodies, labels, redirect targets) or a
key-bearing value passes through `server_text` (or `redact` where no shortening is wanted).
Redaction comes first and matches every run of `KGRAM` or more characters of a key, in each of
the forms a server may echo it (raw, JSON- or Python-escaped, HTML-escaped, percent-encoded),
ignoring ASCII case: so no cut made afterwards, wherever the server placed the key, can leave
a recognisable piece of it behind. Then control characters (escape sequences that clear a
screen or set a window title) are dropped and the text is shortened to a readable length.

Keys are registered once, when they are read from the environment (`remember`), so that every
printer, including the CLI's last-resort error line, redacts them without being handed them.
"""

from __future__ import annotations

import functools
import html
import json
import re
import unicodedata
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

KGRAM = 8  # a run of this many characters of a key is treated as the key
MASK = "***"
SHOWN = 200  # characters of server text shown in a message
WINDOW = 1 << 16  # characters of a long server text examined at all (k-gram safe: see below)

_SECRETS: list[str] = []
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def remember(secret: str | None) -> None:
    """Register a key read this run: from now on every message is redacted of it."""
    if secret and secret not in _SECRETS:
        _SECRETS.append(secret)


def secrets() -> tuple[str, ...]:
    return tuple(_SECRETS)


def secret_forms(secret: str) -> set[str]:
    """The ways a server may echo `secret`: as sent, escaped in JSON, Python or HTML, or
    percent-encoded (upper- or lower-case hex, '+' or '%20' for spaces)."""
    encoded = quote(secret, safe="")
    forms = {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        html.escape(secret),
        encoded,
        quote_plus(secret, safe=""),
        re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded),
        secret.replace("/", "\\/"),  # JSON's optional escape of '/'
    }
    return {f for f in forms if f}


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every run of KGRAM or more characters of a key (in any form of
    `secret_forms`, ASCII case ignored) replaced by ***. A key shorter than KGRAM is matched
    whole. Because any KGRAM-long piece is caught, text cut anywhere afterwards holds none."""
    keys = (*_SECRETS, *(s for s in extra if s))
    if not keys or not text:
        return text
    haystack = text.translate(_LOWER)
    grams, short = _grams(keys)
    hits: list[tuple[int, int]] = []
    if len(grams) < len(haystack):  # few keys: each piece looked for (str.find, in C)
        for gram in grams:
            start = haystack.find(gram)
            while start != -1:
                hits.append((start, start + KGRAM))
                start = haystack.find(gram, start + 1)
    else:  # many keys (a service's clients): each place of the text looked up once
        hits += [
            (i, i + KGRAM)
            for i in range(len(haystack) - KGRAM + 1)
            if haystack[i : i + KGRAM] in grams
        ]
    for form in short:
        start = haystack.find(form)
        while start != -1:
            hits.append((start, start + len(form)))
            start = haystack.find(form, start + 1)
    if not hits:
        return text
    out, cursor = [], 0
    for start, end in _merge(hits):
        out.append(text[cursor:start])
        out.append(MASK)
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


@functools.lru_cache(maxsize=16)
def _grams(keys: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Every KGRAM-long piece of every form of the keys (lower-cased), and the forms shorter
    than KGRAM (matched whole): worked out once per set of keys, not per message."""
    grams: set[str] = set()
    short: set[str] = set()
    for key in keys:
        for form in secret_forms(key):
            form = form.translate(_LOWER)
            if len(form) < KGRAM:
                short.add(form)
            grams.update(form[i : i + KGRAM] for i in range(len(form) - KGRAM + 1))
    return frozenset(grams), tuple(short)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def printable(text: str, limit: int = SHOWN) -> str:
    """One line a terminal shows as it is: control and format characters (escape sequences,
    bidi overrides) dropped, whitespace runs made one space, at most `limit` characters."""
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch)[0] != "C"
    )
    line = " ".join(kept.split())
    return line if len(line) <= limit else line[: max(0, limit - 1)] + "…"


def server_text(value: object, limit: int = SHOWN) -> str:
    """Text a server (or anyone outside) chose, fit to print: redacted first, then made
    printable and shortened. Non-strings are named by their type, never dumped."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        if value is None or isinstance(value, bool | float):
            value = repr(value)
        elif isinstance(value, int):
            value = repr(value) if value.bit_length() < 64 else "<a very large integer>"
        else:
            size = f" of {len(value)}" if hasattr(value, "__len__") else ""
            return f"<{type(value).__name__}{size}>"
    # Only a bounded window is examined: any KGRAM-long piece of a key inside it is masked,
    # so the cut at WINDOW cannot expose one either.
    return printable(redact(value[:WINDOW]), limit)


def redact_url(url: str) -> str:
    """The URL without credentials or query string (where API keys travel), for messages."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a port out of range and the like: show no more than the scheme
        return f"{url.split(':', 1)[0]}://…"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))
