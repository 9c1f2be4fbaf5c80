"""`bbsmooth proxy`: a certifying gateway in front of any black box, on uvicorn.

service.py decides what each request costs and answers (single flight, quotas, deadline);
app.py is the HTTP face (FastAPI routes, limits, errors, metrics). Both stand on the bounded
HTTP edge of httpserver.py, as `bbsmooth serve` does; `serve_proxy` puts the app on it.
"""

from __future__ import annotations

import sys
from typing import Any

from ..httpserver import HttpServer, guarded
from ..options import ProxyOptions
from ..redaction import printable, redact


def serve_proxy(app: Any, settings: ProxyOptions) -> HttpServer:
    """The app on a socket bound now: `run` in the foreground (SIGTERM and Ctrl-C drain the
    requests in flight for up to --shutdown-grace), or `in_thread` for tests and benchmarks."""
    return HttpServer(
        guarded(app, log),
        settings.host,
        settings.port,
        client_timeout=settings.client_timeout,
        max_connections=settings.max_connections,
        tls_key=settings.tls_key,
        tls_cert=settings.tls_cert,
        shutdown_grace=settings.shutdown_grace,
    )


def log(message: str) -> None:
    """One line on the proxy's stderr (its log), redacted and printable."""
    print(f"bbsmooth proxy: {printable(redact(message), 1000)}", file=sys.stderr, flush=True)
