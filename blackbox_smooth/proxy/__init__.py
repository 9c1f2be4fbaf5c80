"""`bbsmooth proxy`: a certifying gateway in front of any black box, on uvicorn.

service.py decides what each request costs and answers (single flight, quotas, deadline);
app.py is the HTTP face (FastAPI routes, limits, errors, metrics); tensors.py reads the Open
Inference Protocol's tensors. `ProxyServer` binds the socket (so a port of 0 is known before
the first request) and runs uvicorn: in the foreground for the CLI (SIGTERM and Ctrl-C drain
the requests in flight for up to --shutdown-grace), or in a thread for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import UsageError
from ..options import ProxyOptions


class ProxyServer:
    """The app on a socket bound now."""

    def __init__(self, app: Any, settings: ProxyOptions) -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((settings.host, settings.port))
        except OSError as e:
            self.socket.close()
            raise UsageError(
                f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}"
            ) from None
        self.port = self.socket.getsockname()[1]
        tls = settings.tls_cert is not None
        scheme = "https" if tls else "http"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"{scheme}://{host}:{self.port}"
        config = uvicorn.Config(
            app,
            http=_bounded_protocol(settings.client_timeout),
            log_level="warning",
            access_log=False,  # a client's key may sit in a query string: nothing logged
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace)),
            timeout_keep_alive=5,
            # no limit_concurrency: uvicorn counts idle connections in it, so a few hundred
            # sockets that never send a request would lock every client out (503); memory is
            # bounded per body instead (--max-bodies, --max-body-bytes, --client-timeout)
            ssl_keyfile=str(settings.tls_key) if tls else None,
            ssl_certfile=str(settings.tls_cert) if tls else None,
            server_header=False,
        )
        self.server = uvicorn.Server(config)

    def run(self) -> None:
        """Serve until SIGTERM or Ctrl-C (which drain the requests in flight)."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[ProxyServer]:
        """Serve in a background thread while the block runs (tests, benchmarks)."""
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        try:
            yield self
        finally:
            self.server.should_exit = True
            thread.join(timeout=60)


def _bounded_protocol(seconds: float) -> Any:
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head: a connection that
    has not sent a whole request head `seconds` after it opened (or after its last answer) is
    closed. uvicorn times nothing before a first request, so sockets that never send one
    would otherwise stay open until the process runs out of file descriptors."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Bounded(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(seconds, self._late, self.cycle)

        def _late(self, cycle_then: Any) -> None:
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()  # no new request began since the timer was set

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._head_timer.cancel()
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return Bounded
