"""The servers bbsmooth starts: `serve` (a local model over the Open Inference Protocol) and
`proxy` (certified predictions over HTTP), each bounded against its clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..endpoint import LOCAL, Endpoint
from ..errors import UsageError
from .fields import at_least, option, positive


@dataclass(frozen=True)
class ServeOptions:
    """`bbsmooth serve`: a local model over the Open Inference Protocol, bounded against its
    clients (request size, slow clients, connections) and optionally behind a key."""

    endpoint: Endpoint = option(
        "",
        "torch:FILE.pt or python:FILE.py:FUNC",
        flags=("--endpoint", "-e"),
        required=True,
        parsed_from=str,
    )
    name: str = option("model", "Model name in /v2/models/NAME.")
    host: str = option("127.0.0.1", "Address to bind (loopback unless you mean it).")
    port: int = option(8000, "Port (0: any free port).")
    delay: float = option(0.0, "Seconds of service delay per request.")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.")
    max_request_bytes: int = option(
        64 * 2**20, "Largest request body accepted (413 beyond, unread)."
    )
    client_timeout: float = option(
        30.0, "Seconds a connection may take to send a request's head, and a body to arrive."
    )
    max_connections: int = option(
        256, "Connections open at once (beyond: the longest idle is closed; 503 if none is)."
    )
    max_bodies: int = option(
        2, "Request bodies read, parsed and answered at once (the others wait their turn)."
    )
    api_key_env: str | None = option(
        None,
        "Require Authorization: Bearer KEY, the key read from this environment variable "
        "(health probes stay open).",
    )

    def __post_init__(self) -> None:
        # Every check before the model loads: a typo fails at once, not after the load.
        object.__setattr__(self, "endpoint", Endpoint.parse(self.endpoint))
        if self.endpoint.kind not in LOCAL:
            raise UsageError("serve needs a local endpoint: torch:FILE.pt or python:FILE.py:FUNC")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        at_least("--max-request-bytes", self.max_request_bytes, 1)
        at_least("--max-connections", self.max_connections, 1)
        at_least("--max-bodies", self.max_bodies, 1)
        positive("--client-timeout", self.client_timeout)


@dataclass(frozen=True)
class ProxyOptions:
    """`bbsmooth proxy`: the smoothed classifier as an HTTP service, bounded against its
    clients (body size, pixels, bodies in memory, a deadline) and optionally behind keys with
    per-client quotas."""

    host: str = option("127.0.0.1", "Address to bind (loopback unless you mean it).")
    port: int = option(8080, "Port (0: any free port).")
    tls_key: Path | None = option(None, "TLS private key file (PEM); with --tls-cert: HTTPS.")
    tls_cert: Path | None = option(None, "TLS certificate chain file (PEM).")
    client_keys_file: Path | None = option(
        None, "Client API keys, one per line: requests then need Authorization: Bearer KEY."
    )
    client_keys_env: str | None = option(
        None, "Environment variable holding comma-separated client API keys (as the file)."
    )
    quota: int | None = option(
        None, "Upstream queries each client key may cost per --quota-period (429 beyond)."
    )
    quota_period: float = option(3600.0, "Seconds of a quota period.")
    deadline: float = option(
        120.0,
        "Seconds a request may take (504 beyond; the certification goes on and is cached, so "
        "the same request again is answered from the cache).",
    )
    max_body_bytes: int = option(16 * 2**20, "Largest request body (413 beyond, unread).")
    max_pixels: int = option(
        40_000_000, "Largest image, in pixels, decoded (a decompression bomb: 413)."
    )
    max_bodies: int = option(32, "Request bodies held in memory at once (503 beyond).")
    client_timeout: float = option(
        30.0,
        "Seconds a connection may take to send a request's head, and a body to arrive (408 "
        "beyond: a slow drip).",
    )
    max_connections: int = option(
        1024, "Connections open at once (beyond: the longest idle is closed; 503 if none is)."
    )
    max_batch: int = option(16, "Images in one Open Inference Protocol request.")
    name: str = option("smoothed", "Model name of the Open Inference Protocol route.")
    shutdown_grace: float = option(
        30.0, "On SIGTERM, seconds to finish the requests in flight before stopping."
    )
    ray: str | None = option(
        None,
        "Serve as a Ray Serve deployment: auto (the running cluster, else a local one started "
        "now) or its address; --max-queries, --rps and --quota hold for all replicas together. "
        "Needs pip install 'blackbox_smooth[ray]'.",
        flags=("--ray",),
    )
    replicas: int = option(2, "Ray Serve replicas (with --ray), each with its own black box.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        if (self.tls_key is None) != (self.tls_cert is None):
            raise UsageError("--tls-key and --tls-cert go together: give both, or neither")
        at_least("--quota", self.quota, 1)
        positive("--quota-period", self.quota_period)
        positive("--deadline", self.deadline)
        at_least("--max-body-bytes", self.max_body_bytes, 1024)
        at_least("--max-pixels", self.max_pixels, 1)
        at_least("--max-bodies", self.max_bodies, 1)
        at_least("--max-connections", self.max_connections, 1)
        at_least("--max-batch", self.max_batch, 1)
        positive("--shutdown-grace", self.shutdown_grace)
        positive("--client-timeout", self.client_timeout)
        at_least("--replicas", self.replicas, 1)
        if self.ray is not None and not self.ray.strip():
            raise UsageError("--ray takes auto or the cluster's address")
        if self.ray is not None and self.tls_cert is not None:
            raise UsageError(
                "--tls-cert with --ray: Ray Serve's HTTP proxy serves plain HTTP; put TLS in "
                "front of it (a load balancer), or serve without --ray"
            )
        if not (0 < len(self.name) <= 100 and all(c.isalnum() or c in "-_." for c in self.name)):
            raise UsageError("--name must be 1 to 100 letters, digits, '-', '_' or '.'")
