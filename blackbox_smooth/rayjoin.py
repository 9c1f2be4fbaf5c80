"""Joining a Ray cluster for `evaluate --ray` and the proxy's replicas: `--ray ADDRESS`, or
`--ray auto`.

`--ray auto` joins only a cluster this user started on this machine: Ray's own `auto` takes
the address in /tmp/ray/ray_current_cluster or of any raylet running here, and /tmp/ray is
world-writable, so another user could point the driver (and the credentials in its endpoint
options) at a cluster of theirs.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from .errors import UsageError, warn


def ray_module() -> Any:
    """Ray, imported only for --ray; one line that says how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install 'blackbox_smooth[ray]'"
        ) from None
    return ray


def connect(ray: Any, address: str) -> None:
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
