"""Who may reach a server we start (`serve`, `proxy`): the keys its requests need, read from
files and the environment and never printed, and a warning when it listens beyond loopback."""

from __future__ import annotations

import os
import re

from ..adapters.auth import read_key
from ..errors import UsageError, warn
from ..httpserver import resolves_to_loopback
from ..inputs import read_text
from ..options import ProxyOptions
from ..redaction import remember


def server_key(variable: str | None) -> str | None:
    """The key `bbsmooth serve` requires (--api-key-env), or None when it requires none."""
    if variable is None:
        return None
    key = read_key(variable) if variable else None
    if not key:  # name the variable, never a value
        raise UsageError(f"--api-key-env {variable}: that variable is not set or is empty")
    return key


def client_keys(settings: ProxyOptions) -> list[str]:
    """The client API keys, from the file (one per line, # comments) and the variable
    (comma-separated); each registered for redaction, never printed."""
    keys: list[str] = []
    if settings.client_keys_file is not None:
        text = read_text(settings.client_keys_file, "--client-keys-file", 2**20)
        keys += [line.strip() for line in text.splitlines()]
    if settings.client_keys_env is not None:
        value = os.environ.get(settings.client_keys_env)
        if not value:
            raise UsageError(
                f"--client-keys-env {settings.client_keys_env}: that variable is not set or empty"
            )
        keys += [k.strip() for k in value.split(",")]
    keys = [k for k in keys if k and not k.startswith("#")]
    for k in keys:
        remember(k)
        if not re.fullmatch(r"[\x21-\x7e]+", k):
            raise UsageError("a client key holds whitespace, control or non-ASCII characters")
    if (settings.client_keys_file or settings.client_keys_env) and not keys:
        raise UsageError("no client keys given: the file or variable holds none")
    return keys


def warn_if_exposed(host: str, what: str, needs: str | None, option: str) -> None:
    """A server beyond loopback: say so, and what key its requests need (`needs`), if any."""
    try:
        local = resolves_to_loopback(host)
    except (OSError, UnicodeError, ValueError) as e:
        reason = getattr(e, "strerror", None) or "not a host name or address"
        raise UsageError(f"cannot use --host {host!r}: {reason}") from e
    if not local:
        need = f"requests need {needs}" if needs else f"use {option} to require a key"
        warn(f"serving on {host or 'all interfaces'} exposes {what} beyond this machine; {need}")
