"""What identifies an endpoint's URL: the URL for fingerprints (one spelling per endpoint, no
credential parameter), and whether a host, as written, names this machine. The URL as messages
show it (no credentials, no query string) is `redaction.redact_url`."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..redaction import redact as redact_secrets
from ..redaction import redact_url
from .auth import Auth

# Query parameters that carry credentials: never part of a fingerprint, never stored.
CREDENTIAL_PARAMS = {
    "key", "apikey", "api_key", "token", "access_token", "accesstoken", "auth", "authorization",
    "sig", "signature", "secret", "client_secret", "password", "subscription_key", "code",
    "x_api_key", "api_token", "id_token", "refresh_token", "session", "sessionid",
}  # fmt: skip


def identity_url(url: str, auth: Auth | None = None) -> str:
    """What identifies the endpoint in a fingerprint: the URL with its query string (which often
    picks the model or API version) but without credentials: no user:password, no parameter
    named like a credential or named by `--auth query:NAME`, none whose value holds the key."""
    parts = urlsplit(url)
    credential = set(CREDENTIAL_PARAMS)
    if auth is not None and auth.style.startswith("query:"):
        credential.add(_param_name(auth.style.partition(":")[2]))
    kept = sorted(
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if _param_name(name) not in credential and redact_secrets(value) == value
    )
    scheme, netloc, path = urlsplit(redact_url(url))[:3]
    return urlunsplit((*_normal(scheme, netloc, path), urlencode(kept), ""))


_UNRESERVED = re.compile(r"%(4[1-9A-F]|5[0-9A]|6[1-9A-F]|7[0-9A]|3[0-9]|2D|2E|5F|7E)", re.I)
DEFAULT_PORTS = {"http": "80", "https": "443"}


def _normal(scheme: str, netloc: str, path: str) -> tuple[str, str, str]:
    """One spelling for the URLs that name the same endpoint (RFC 3986's normalisation, and
    no trailing slash, this machine by one name), so that a second look cannot pass as a
    first by a new spelling: HTTP://Host:80/a/./b/ is http://host/a/b."""
    scheme = scheme.lower()
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a port out of range: left as written (the request fails anyway)
        return scheme, netloc.lower(), path
    if is_loopback_name(host):  # 127.0.0.1, ::1, localhost: this machine, however spelled
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    shown = "" if port is None or str(port) == DEFAULT_PORTS.get(scheme) else f":{port}"
    netloc = f"{host}{shown}"
    path = _UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in (".", ""):
            segments.append(segment)
    return scheme, netloc, "/" + "/".join(segments)


def _param_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def is_loopback_name(host: str) -> bool:
    """Whether `host`, as written, names this machine only (localhost, 127.0.0.0/8, ::1);
    no name is looked up (httpserver.resolves_to_loopback is the check that looks it up)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
