"""`evaluate --ray`: one evaluation spread over a Ray cluster, with the rows one machine gives.

- `ClusterLimits`, one actor: the user's bill and the vendor's rate limit see the whole cluster,
  so `--max-queries` (reserved before sending, as on one machine) and `--rps` (request starts
  spaced over the cluster) are kept in one place.
- `Worker`, one actor per CPU (per GPU for a local model on GPUs): opens the black box, the
  front end and its node's cache once, and certifies the images it is handed; its budget and
  its rate limit ask that actor. Noise is a function of (seed, image, region, block), so
  which worker certifies an image changes nothing in its row.
- `certify_rows`, the driver: hands an image to each worker as one frees up, records each row
  in its cache's journal as it arrives (a driver started again skips those images), and
  returns the rows in input order.

A worker that dies is restarted by Ray and its images are retried; what it had answered is in
its node's cache, so only the requests it had in flight are sent again. SIGTERM stops the
driver as Ctrl-C does (its workers killed, a cluster it started shut down), then exits 143.

Joining the cluster (`--ray ADDRESS`, `--ray auto`) is rayjoin.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .adapters.http import RateLimit
from .budget import Budget
from .data import STRETCH, Fit
from .errors import BBSmoothError, Terminated, warn
from .evaluate import Dataset, Row, load_for, row_of
from .options import CertifyOptions, ClusterOptions, SmoothingOptions
from .rayjoin import connect, ray_module

if TYPE_CHECKING:
    from .cache import BlockCache
    from .smooth import Smoothed

RESTARTS = 3  # a worker that dies is restarted this often, and its images retried as often
JOURNAL = "evaluate-row-v1"


class ClusterLimits:
    """The cluster-wide query budget and request rate (a Ray actor: its calls run one by one)."""

    def __init__(self, max_queries: int | None, rps: float | None) -> None:
        self.budget = Budget(max_queries)
        self.rate = RateLimit(rps)

    def reserve(self, k: int) -> None:
        self.budget.take(k)  # BudgetExhausted past --max-queries, before anything is sent

    def slot(self) -> float:
        """Seconds the caller waits before its request starts: starts 1/rps apart."""
        return self.rate.delay()


class SharedBudget(Budget):
    """A worker's budget: every reservation is the cluster's (`ClusterLimits`)."""

    def __init__(self, limits: Any) -> None:
        super().__init__(None)
        self.limits = limits

    async def reserve(self, k: int) -> None:
        await _unwrapped(self.limits.reserve.remote(k))
        self.reserved += k

    def release(self, k: int) -> None:
        """The cluster's limits keep what was reserved there: the cluster's budget errs safe."""
        super().release(k)


class SharedRate:
    """A worker's rate limit (`HttpTransport.rate`): request starts spaced cluster-wide."""

    def __init__(self, limits: Any) -> None:
        self.limits = limits

    async def wait(self) -> None:
        delay = await _unwrapped(self.limits.slot.remote())
        if delay > 0:
            await asyncio.sleep(delay)


async def _unwrapped(ref: Any) -> Any:
    """A Ray call's result; our own error as itself (a RayTaskError would carry a traceback)."""
    try:
        return await ref
    except Exception as e:
        raise _cause(e) from None


def _cause(e: BaseException) -> BaseException:
    """Our own error inside Ray's wrappers (RayTaskError and the classes Ray makes of it and
    the cause's class, whose text carries a traceback), or `e`."""
    seen = e
    while not _ours(seen) and getattr(seen, "cause", None) is not None:
        seen = seen.cause  # type: ignore[attr-defined]
    return seen if _ours(seen) else e


def _ours(e: BaseException) -> bool:
    return isinstance(e, BBSmoothError) and not type(e).__module__.startswith("ray")


def shared(smoothed: Smoothed, limits_name: str, rps: bool) -> Smoothed:
    """`smoothed` with its budget (and with `rps`, its rate limit) the cluster's."""
    limits = ray_module().get_actor(limits_name)
    smoothed.votes.budget = SharedBudget(limits)
    transport = smoothed.blackbox.transport
    if rps and transport is not None:
        transport.rate = SharedRate(limits)
    return smoothed


class Worker:
    """One process's black box, front end and cache, opened once (a Ray actor)."""

    def __init__(
        self,
        open_smoothed: Callable[[], Smoothed],
        limits_name: str,
        size: tuple[int, int] | None,
        grayscale: bool,
        rps: bool,
        fit: Fit = STRETCH,
    ) -> None:
        # by name, not by handle: Ray restarts an actor only from arguments it holds by value
        self.smoothed = shared(open_smoothed(), limits_name, rps)
        self.load = load_for(size, grayscale, fit)

    def identity(self) -> dict[str, Any]:
        return self.smoothed.identity

    def pid(self) -> int:
        return os.getpid()

    async def certify(
        self, i: int, path: str, label: int, arguments: dict[str, Any], adaptive: bool
    ) -> Row:
        run = self.smoothed.certify_adaptive if adaptive else self.smoothed.certify
        try:
            return row_of(i, label, await run(self.load(path), **arguments))
        except Exception as e:
            raise _cause(e) from None


def certify_rows(
    cluster: ClusterOptions,
    options: SmoothingOptions,
    open_smoothed: Callable[[], Smoothed],
    dataset: Dataset,
    indices: list[int],
    plan: CertifyOptions,
    size: tuple[int, int] | None,
    grayscale: bool,
    journal: BlockCache | None,
    on_row: Callable[[Row], None] = lambda row: None,
    fit: Fit = STRETCH,
) -> list[Row]:
    """Certify `dataset`'s images `indices` on Ray workers, each opening `open_smoothed()`
    once; rows in input order, each also given to `on_row` as it arrives."""
    ray = ray_module()
    started = not ray.is_initialized()
    arguments, adaptive = plan.arguments(), plan.adaptive
    images_in_flight = max(1, options.wire.concurrency // 4)  # as on one machine
    image = [list(size) if size else None, grayscale, *fit.key()]
    actors: list[Any] = []  # every actor started, the limits first: all killed at the end
    sigterm = _Sigterm(journal is not None)
    try:
        if started:
            with sigterm.held(ray):
                connect(ray, cluster.ray or "auto")
        worker = (open_smoothed, size, grayscale, fit)
        _start_actors(ray, cluster, options, worker, images_in_flight, actors)
        workers = actors[1:]
        first = workers[0].identity.remote()
        while not ray.wait([first], timeout=0.2)[0]:  # bounded, as below: a worker may take long
            sigterm.check()
        key = {"identity": _get(ray, first), "arguments": arguments, "image": image}
        rows, todo = _recorded(journal, key, dataset, indices)
        for row in rows:
            on_row(row)
        if rows:
            warn(f"{len(rows)} of {len(indices)} images were certified by an earlier run of "
                 "this evaluation (its journal in the cache): not certified again")  # fmt: skip

        def done(i: int, row: Row) -> None:
            if journal is not None:
                journal.put_record(_journal_key(key, dataset, i), row.__dict__)
            rows.append(row)
            on_row(row)

        def task(i: int) -> tuple[Any, ...]:
            return (i, dataset.paths[i], dataset.labels[i], arguments, adaptive)

        _deal(ray, workers, todo, images_in_flight, task, done, sigterm)
        return sorted(rows, key=lambda r: r.idx)
    finally:
        try:
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()
        finally:
            sigterm.restore()


def _start_actors(
    ray: Any,
    cluster: ClusterOptions,
    options: SmoothingOptions,
    worker: tuple[Callable[[], Smoothed], tuple[int, int] | None, bool, Fit],
    images_in_flight: int,
    actors: list[Any],
) -> None:
    """The cluster's limits, then the workers, appended to `actors` as each starts (so that
    one started before a failure is still killed)."""
    open_smoothed, size, grayscale, fit = worker
    local = not options.endpoint.remote and options.device != "cpu"
    workers, resources = _plan(ray, cluster, local)
    limits = (options.max_queries, options.wire.rps)
    name = f"bbsmooth-limits-{uuid.uuid4().hex}"
    actors.append(ray.remote(ClusterLimits).options(num_cpus=0, name=name).remote(*limits))
    actor = ray.remote(Worker).options(
        max_restarts=RESTARTS,
        max_task_retries=RESTARTS,
        max_concurrency=images_in_flight,
        **resources,
    )
    for _ in range(workers):
        actors.append(
            actor.remote(open_smoothed, name, size, grayscale, limits[1] is not None, fit)
        )


def _deal(
    ray: Any,
    workers: list[Any],
    todo: list[int],
    images_in_flight: int,
    task: Callable[[int], tuple[Any, ...]],
    done: Callable[[int, Row], None],
    sigterm: _Sigterm,
) -> None:
    """Hand the images `todo` to the workers, one more to each as it returns a row."""
    queue = list(reversed(todo))
    flying: dict[Any, tuple[int, Any]] = {}

    def submit(worker: Any) -> None:
        i = queue.pop()
        flying[worker.certify.remote(*task(i))] = (i, worker)

    # dealt in turn, so that every worker has some; one more than it certifies at once
    # waits in its queue, so that it never idles while the driver hands out the next
    for _ in range(images_in_flight + 1):
        for worker in workers:
            if queue:
                submit(worker)
    while flying:
        # a bounded wait: Ctrl-C reaches Python only between calls, so an unbounded wait
        # would hold it until the next image is done
        ready, _ = ray.wait(list(flying), num_returns=1, timeout=0.2)
        sigterm.check()
        if not ready:
            continue
        i, worker = flying.pop(ready[0])
        done(i, _get(ray, ready[0]))
        if queue:
            submit(worker)


class _Sigterm:
    """SIGTERM while the driver holds a cluster: noted by the handler and raised as
    `Terminated` by `check`, between two bounded waits of the driver, so that the `finally` of
    `certify_rows` kills the workers and shuts down a cluster it started, as it does for
    Ctrl-C. Not raised in the handler itself: an exception raised inside Ray's compiled waits
    comes out as a SystemError. While Ray starts, Ray's own handlers are kept out (they exit
    at once, with no word and no cleanup of ours). Off the main thread (a library caller's
    thread), signals are not ours to take: nothing is installed."""

    def __init__(self, journal: bool) -> None:
        self.journal = journal
        self.active = threading.current_thread() is threading.main_thread()
        self.received = False
        # None: a handler set from C, which Python cannot put back; the default instead
        self.previous: Any = (signal.getsignal(signal.SIGTERM) if self.active else None) or (
            signal.SIG_DFL
        )
        if self.active:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def check(self) -> None:
        """Terminated, once SIGTERM has come."""
        if self.received:
            kept = (" (the rows done are in the cache's journal: run the same command again "
                    "to resume)" if self.journal else "")  # fmt: skip
            raise Terminated(f"terminated by SIGTERM: the Ray workers were stopped{kept}")

    @contextlib.contextmanager
    def held(self, ray: Any) -> Iterator[None]:
        """Keep Ray's SIGTERM handlers out while `ray.init` runs (Ray installs them through
        `ray._private.utils.set_sigterm_handler`, which does nothing meanwhile); a SIGTERM
        that came meanwhile is raised once it has returned."""
        utils: Any = getattr(getattr(ray, "_private", None), "utils", None)
        install = getattr(utils, "set_sigterm_handler", None)
        if not self.active:
            yield
            return
        if install is not None:
            utils.set_sigterm_handler = lambda handler: None
        try:
            yield
        finally:
            if install is not None:
                utils.set_sigterm_handler = install
            signal.signal(signal.SIGTERM, self._handle)  # ours again, whatever Ray did
        self.check()

    def restore(self) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


def _plan(ray: Any, cluster: ClusterOptions, local: bool) -> tuple[int, dict[str, Any]]:
    """How many workers, and what each reserves: a GPU each for a local model where the
    cluster has GPUs (and --device is not cpu); else a share of the CPUs."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if local and gpus:
        return cluster.workers or gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = max(1.0, float(total.get("CPU", 1)))
    workers = cluster.workers or int(cpus)
    return workers, {"num_cpus": min(1.0, cpus / workers)}


def _get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except Exception as e:
        cause = _cause(e)
        if cause is e and isinstance(e, ray.exceptions.RayError):
            raise BBSmoothError(f"a Ray worker failed: {str(e).splitlines()[0]}") from None
        raise cause from None


def _journal_key(key: dict[str, Any], dataset: Dataset, i: int) -> str:
    from .cache import cache_key
    from .digests import file_digest

    path = dataset.paths[i]
    return cache_key(kind=JOURNAL, **key, index=i, label=dataset.labels[i], file=file_digest(path))


def _recorded(
    journal: BlockCache | None, key: dict[str, Any], dataset: Dataset, indices: list[int]
) -> tuple[list[Row], list[int]]:
    """Rows an earlier driver recorded for this very evaluation (shown as sent now: 0, as a
    replay from the cache would be), and the indices still to certify."""
    if journal is None:
        return [], list(indices)
    rows, todo = [], []
    for i in indices:
        seen = journal.get_record(_journal_key(key, dataset, i))
        try:
            rows.append(Row(**{**seen, "sent": 0}))
        except TypeError:  # none, or not a row we wrote
            todo.append(i)
    return rows, todo
