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
its node's cache, so only the requests it had in flight are sent again. SIGTERM stops the
driver as Ctrl-C does (its workers killed, a cluster it started shut down), then exits 143.

`--ray auto` joins only a cluster this user started on this machine: Ray's own `auto` takes
the address in /tmp/ray/ray_current_cluster or of any raylet running here, and /tmp/ray is
world-writable, so another user could point the driver (and the credentials in its endpoint
options) at a cluster of theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .adapters.http import RateLimit
from .data import STRETCH, Fit
from .errors import BBSmoothError, Terminated, UsageError, warn
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

    def release(self, k: int) -> None:
        """The coordinator keeps what was reserved there: the cluster's budget errs safe."""
        super().release(k)


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


def shared(smoothed: Smoothed, coordinator_name: str, rps: bool) -> Smoothed:
    """`smoothed` with its budget (and with `rps`, its rate limit) the coordinator's."""
    coordinator = ray_module().get_actor(coordinator_name)
    smoothed.votes.budget = SharedBudget(coordinator)
    transport = smoothed.blackbox.transport
    if rps and transport is not None:
        transport.rate = SharedRate(coordinator)
    return smoothed


class Worker:
    """One process's black box, front end and cache, opened once (a Ray actor)."""

    def __init__(
        self,
        open_smoothed: Callable[[], Smoothed],
        coordinator_name: str,
        size: tuple[int, int] | None,
        grayscale: bool,
        rps: bool,
        fit: Fit = STRETCH,
    ) -> None:
        # by name, not by handle: Ray restarts an actor only from arguments it holds by value
        self.smoothed = shared(open_smoothed(), coordinator_name, rps)
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
    actors: list[Any] = []
    coordinator = None
    sigterm = _Sigterm(journal is not None)
    try:
        if started:
            with sigterm.held(ray):
                _connect(ray, cluster.ray or "auto")
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
            actor.remote(open_smoothed, name, size, grayscale, limits[1] is not None, fit)
            for _ in range(workers)
        ]
        first = actors[0].identity.remote()
        while not ray.wait([first], timeout=0.2)[0]:  # bounded, as below: a worker may take long
            sigterm.check()
        identity = _get(ray, first)
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
            sigterm.check()
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
        try:
            for a in [*actors, *([coordinator] if coordinator is not None else [])]:
                ray.kill(a)
            if started:
                ray.shutdown()
        finally:
            sigterm.restore()


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


def _connect(ray: Any, address: str) -> None:
    """`auto`: RAY_ADDRESS, else a cluster this user started on this machine (`_own_cluster`),
    else a local one started now."""
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address != "auto":
            ray.init(address=address, **quiet)
            return
        environment = os.environ.get("RAY_ADDRESS", "")
        if environment not in ("", "auto", "local"):  # the user's own choice, as --ray ADDRESS
            ray.init(address=environment, **quiet)
            return
        # "local" is Ray's word for "start a new one"
        chosen, refused = (None, None) if environment == "local" else _own_cluster()
        if chosen is not None:
            _token_auth_as_found()
            ray.init(address=chosen, **quiet)
            return
        if refused is not None:
            warn(f"--ray auto: the Ray cluster at {refused} was found through another user's "
                 "files or processes: not joined, starting one of our own")  # fmt: skip
        # "local": a new cluster even where Ray would find one; on loopback only, and in a
        # folder of ours when Ray's shared one is another user's
        temp = _ray_temp_dir()
        private = {} if _owned(temp, folder=True) else {"_temp_dir": _private_temp_dir()}
        ray.init(address="local", _node_ip_address="127.0.0.1", **private, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UsageError(f"--ray {address}: cannot reach a Ray cluster ({e})") from None


def _own_cluster() -> tuple[str | None, str | None]:
    """(the address `--ray auto` joins, an address it refused), looked for as Ray's `auto`
    looks: the address that `ray start` recorded in Ray's folder, then that of any raylet
    running here; but only an address that a raylet of this user serves, read from a file
    this user owns."""
    mine, theirs = _raylet_addresses()
    recorded, its_owner = _recorded_address(os.path.join(_ray_temp_dir(), "ray_current_cluster"))
    if recorded is not None and its_owner == os.getuid():
        if recorded in mine:
            return recorded, None
        if recorded not in theirs:
            recorded = None  # our own record of a cluster gone: nothing to say
    if mine:
        return sorted(mine)[0], None
    return None, recorded or (sorted(theirs)[0] if theirs else None)


def _token_auth_as_found() -> None:
    """Ray sends the user's token (~/.ray/auth_token) to a cluster that its `auto` found on
    this machine, never to an address given explicitly; we give the address we found (and
    checked) explicitly, so ask for what `auto` would have done."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available as enable,
        )
    except ImportError:  # a Ray without token authentication
        return
    import logging

    log = logging.getLogger(enable.__module__)
    level = log.level
    log.setLevel(logging.ERROR)  # its notice that auth is on: a line the user cannot act on
    try:
        enable(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def _ray_temp_dir() -> str:
    """Ray's shared folder, where `ray start` records its address (as Ray finds it:
    ray._common.utils.get_default_ray_temp_dir)."""
    root = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    return os.path.join(root or "/tmp", "ray")


def _private_temp_dir() -> str:
    """A folder for a local cluster's sessions that only this user can write."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"ray-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    if not _owned(path, folder=True):
        raise UsageError(f"--ray auto: {path} belongs to another user: set RAY_TMPDIR to a "
                         "folder of yours")  # fmt: skip
    return path


def _owned(path: str, *, folder: bool = False) -> bool:
    """Whether `path` itself (not what a link points to) exists and is this user's, or
    does not exist yet (Ray will make it, ours)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    kind = stat.S_ISDIR(info.st_mode) if folder else stat.S_ISREG(info.st_mode)
    return kind and info.st_uid == os.getuid()


def _recorded_address(path: str) -> tuple[str | None, int | None]:
    """The address in Ray's address file and the file's owner, read through one descriptor
    (the owner checked is that of the bytes read; a link is not followed); (None, None)
    when there is none or it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None, None
        text = f.read(1024).decode("utf-8", "replace").strip()
    return (text or None), info.st_uid


def _raylet_addresses() -> tuple[set[str], set[str]]:
    """The cluster addresses (--gcs-address) of the raylets running on this machine: (this
    user's, other users')."""
    import psutil  # Ray's own dependency

    mine: set[str] = set()
    theirs: set[str] = set()
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmdline, uids = proc.info["cmdline"], proc.info["uids"]
        except (psutil.Error, KeyError):
            continue
        if not cmdline or "raylet" not in os.path.basename(cmdline[0]) or uids is None:
            continue
        found = {a.split("=", 1)[1] for part in cmdline for a in part.split(" ")
                 if a.startswith("--gcs-address=")} - {"", "None"}  # fmt: skip
        (mine if uids.real == os.getuid() else theirs).update(found)
    return mine, theirs


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
