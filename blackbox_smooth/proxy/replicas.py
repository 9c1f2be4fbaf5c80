"""`bbsmooth proxy --ray auto|ADDRESS --replicas N`: the same app as a Ray Serve deployment.

Each replica builds the app itself (`jobs.proxy_app`: its black box, front end, cache and
ledger, opened once), behind Ray Serve's HTTP proxy. What the upstream sees is kept in one
place, the limits actor of `evaluate --ray` (cluster.ClusterLimits) with the clients' quotas added:
`--max-queries` and `--rps` hold for all replicas together, and so does each client's quota.
Single flight holds within a replica: identical requests routed to two replicas at once may
both certify (the second replays what the first has cached by then).

The driver (this process) deploys, prints the address, and waits; SIGTERM or Ctrl-C takes the
deployment down (Ray Serve drains the requests in flight) and a cluster it started with it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..cluster import ClusterLimits, _unwrapped
from ..errors import UsageError
from ..httpserver import guarded
from ..options import ProxyOptions
from ..rayjoin import connect, ray_module
from . import log
from .service import Quotas

APP = "bbsmooth-proxy"


class ProxyLimits(ClusterLimits):
    """The cluster's budget and rate, and every client's quota (a Ray actor)."""

    def __init__(
        self, max_queries: int | None, rps: float | None, quota: int | None, period: float
    ) -> None:
        super().__init__(max_queries, rps)
        self.quotas = Quotas(quota, period)

    def reserve_quota(self, client: str, queries: int) -> None:
        self.quotas.reserve(client, queries)

    def settle_quota(self, client: str, reserved: int, spent: int) -> None:
        self.quotas.settle(client, reserved, spent)


class SharedQuotas:
    """A replica's quotas: the cluster's (`ProxyLimits`)."""

    def __init__(self, limits: Any) -> None:
        self.limits = limits

    async def reserve(self, client: str, queries: int) -> None:
        await _unwrapped(self.limits.reserve_quota.remote(client, queries))

    def settle(self, client: str, reserved: int, spent: int) -> None:
        self.limits.settle_quota.remote(client, reserved, spent)  # in order, not awaited


class RayProxy:
    """The deployment on a Ray cluster, until `stop`."""

    def __init__(
        self,
        build: Callable[[str], Any],
        settings: ProxyOptions,
        limits: tuple[int | None, float | None],
    ) -> None:
        """`build(limits_name)` makes a replica's app; `limits`: --max-queries, --rps."""
        ray = ray_module()
        try:
            from ray import serve
        except ImportError:
            raise UsageError(
                "--ray needs Ray Serve, which is not installed: pip install 'blackbox_smooth[ray]'"
            ) from None
        self.ray, self.serve = ray, serve
        deploy: Any = serve.deployment  # its overloads confuse a type checker
        self.started = not ray.is_initialized()
        self.grace = settings.shutdown_grace
        self.limits: Any = None
        try:
            if self.started:
                connect(ray, settings.ray or "auto")
            name = f"bbsmooth-proxy-limits-{uuid.uuid4().hex}"
            self.limits = (
                ray.remote(ProxyLimits)
                .options(num_cpus=0, name=name)
                .remote(*limits, settings.quota, settings.quota_period)
            )
            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines
            serve.start(http_options={"host": settings.host, "port": settings.port})
            deployment = deploy(
                serve.ingress(lambda: guarded(build(name), log))(),
                name="proxy",
                num_replicas=settings.replicas,
                ray_actor_options={"num_cpus": 0},  # the replicas wait on the upstream
                # a request waiting on its certification counts as ongoing: many per replica
                max_ongoing_requests=4 * settings.max_bodies,
            )
            try:
                serve.run(deployment.bind(), name=APP, route_prefix="/")
            except RuntimeError as e:  # a replica failed: Ray's text is a traceback
                raise UsageError(
                    f"the proxy's replicas did not start ({str(e).splitlines()[0][:200]}); "
                    "Ray Serve's log says why: /tmp/ray/session_latest/logs/serve"
                ) from None
        except BaseException:
            self.stop()
            raise
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{host}:{settings.port}"

    def run(self) -> None:
        """Until SIGTERM or Ctrl-C (main thread), then `stop`."""
        stopped = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        try:
            while not stopped.is_set():
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Take the deployment down, draining requests in flight for up to --shutdown-grace,
        then a cluster this process started. Bounded: a SIGTERM sent to the whole process
        group (systemd, `timeout`) has taken Ray's own processes down too, and a call to a
        cluster that is gone would wait for ever."""

        def drain() -> None:
            if self.ray.is_initialized():
                self.serve.delete(APP, _blocking=False)
                end = time.monotonic() + self.grace
                while time.monotonic() < end and APP in self.serve.status().applications:
                    time.sleep(0.2)
                if self.started:
                    self.serve.shutdown()
            if self.limits is not None:
                self.ray.kill(self.limits)

        def down() -> None:
            if self.started and self.ray.is_initialized():
                self.ray.shutdown()

        for step, seconds in ((drain, self.grace + 10), (down, 15)):
            thread = threading.Thread(target=_quietly, args=(step,), daemon=True)
            thread.start()
            thread.join(seconds)
        self.limits = None


def _quietly(step: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        step()
