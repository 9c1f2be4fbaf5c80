"""`evaluate --ray`: one evaluation spread over a Ray cluster, with the rows one machine gives.

- `Coordinator`, one actor: the user's bill and the vendor's rate limit see the whole cluster,
  so `--max-queries` (reserved before sending, as on one machine) and `--rps` (request starts
  spaced over the cluster) are kept in one place.
- `Worker`, one actor per CPU (per GPU for a local model on GPUs): opens the black box, the
  front end and its node's cache once, and certifies the images it is handed; its budget and
  its rate limit ask the coordinator. Noise is a function of (seed, image, region, block), so
  which worker certifies an image changes nothing in its row.
- `certify_rows`, the driver: hands an image to each worker as one frees up, records each row
  in its cache's journal as it arrives (a driver started again skips those images), and
  returns the rows in input order.

A worker that dies is restarted by Ray and its images are retried; what it had answered is in
its node's cache, so only the requests it had in flight are sent again.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .adapters.http import RateLimit
from .errors import BBSmoothError, UsageError, warn
from .evaluate import Dataset, Row, load_for, row_of
from .options import CertifyOptions, ClusterOptions, SmoothingOptions
from .votes import Budget

if TYPE_CHECKING:
    from .cache import BlockCache
    from .smooth import Smoothed

RESTARTS = 3  # a worker that dies is restarted this often, and its images retried as often
JOURNAL = "evaluate-row-v1"


def ray_module() -> Any:
    """Ray, imported only for --ray; one line that says how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install 'blackbox_smooth[ray]'"
        ) from None
    return ray


class Coordinator:
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
    """A worker's budget: every reservation is the coordinator's."""

    def __init__(self, coordinator: Any) -> None:
        super().__init__(None)
        self.coordinator = coordinator

    async def reserve(self, k: int) -> None:
        await _unwrapped(self.coordinator.reserve.remote(k))
        self.reserved += k


class SharedRate:
    """A worker's rate limit (`HttpTransport.rate`): request starts spaced cluster-wide."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    async def wait(self) -> None:
        delay = await _unwrapped(self.coordinator.slot.remote())
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


class Worker:
    """One process's black box, front end and cache, opened once (a Ray actor)."""

    def __init__(
        self,
        open_smoothed: Callable[[], Smoothed],
        coordinator_name: str,
        size: tuple[int, int] | None,
        grayscale: bool,
        rps: bool,
    ) -> None:
        # by name, not by handle: Ray restarts an actor only from arguments it holds by value
        coordinator = ray_module().get_actor(coordinator_name)
        self.smoothed = open_smoothed()
        self.smoothed.votes.budget = SharedBudget(coordinator)
        transport = getattr(self.smoothed.blackbox, "transport", None)
        if rps and transport is not None:
            transport.rate = SharedRate(coordinator)
        self.load = load_for(size, grayscale)

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
) -> list[Row]:
    """Certify `dataset`'s images `indices` on Ray workers, each opening `open_smoothed()`
    once; rows in input order, each also given to `on_row` as it arrives."""
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        _connect(ray, cluster.ray or "auto")
    arguments, adaptive = plan.arguments(), plan.adaptive
    images_in_flight = max(1, options.wire.concurrency // 4)  # as on one machine
    image = [list(size) if size else None, grayscale]
    actors: list[Any] = []
    coordinator = None
    try:
        local = options.local_model is not None and options.device != "cpu"
        workers, resources = _plan(ray, cluster, local)
        limits = (options.max_queries, options.wire.rps)
        name = f"bbsmooth-coordinator-{uuid.uuid4().hex}"
        coordinator = ray.remote(Coordinator).options(num_cpus=0, name=name).remote(*limits)
        actor = ray.remote(Worker).options(
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
            max_concurrency=images_in_flight,
            **resources,
        )
        actors = [
            actor.remote(open_smoothed, name, size, grayscale, limits[1] is not None)
            for _ in range(workers)
        ]
        identity = _get(ray, actors[0].identity.remote())
        key = {"identity": identity, "arguments": arguments, "image": image}
        rows, todo = _recorded(journal, key, dataset, indices)
        for row in rows:
            on_row(row)
        if rows:
            warn(f"{len(rows)} of {len(indices)} images were certified by an earlier run of "
                 "this evaluation (its journal in the cache): not certified again")  # fmt: skip
        queue = list(reversed(todo))
        flying: dict[Any, tuple[int, Any]] = {}

        def submit(worker: Any) -> None:
            i = queue.pop()
            args = (i, dataset.paths[i], dataset.labels[i], arguments, adaptive)
            flying[worker.certify.remote(*args)] = (i, worker)

        # dealt in turn, so that every worker has some; one more than it certifies at once
        # waits in its queue, so that it never idles while the driver hands out the next
        for _ in range(images_in_flight + 1):
            for worker in actors:
                if queue:
                    submit(worker)
        while flying:
            # a bounded wait: Ctrl-C reaches Python only between calls, so an unbounded wait
            # would hold it until the next image is done
            done, _ = ray.wait(list(flying), num_returns=1, timeout=0.2)
            if not done:
                continue
            i, worker = flying.pop(done[0])
            row = _get(ray, done[0])
            if journal is not None:
                journal.put_record(_journal_key(key, dataset, i), row.__dict__)
            rows.append(row)
            on_row(row)
            if queue:
                submit(worker)
        return sorted(rows, key=lambda r: r.idx)
    finally:
        for a in [*actors, *([coordinator] if coordinator is not None else [])]:
            ray.kill(a)
        if started:
            ray.shutdown()


def _connect(ray: Any, address: str) -> None:
    """`auto`: the running cluster (RAY_ADDRESS, or one `ray start` made), else a local one."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address != "auto":
            ray.init(address=address, **quiet)
            return
        try:
            ray.init(address="auto", **quiet)
        except ConnectionError:  # none running: one on this machine, on loopback only
            ray.init(_node_ip_address="127.0.0.1", **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({e})") from None


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
