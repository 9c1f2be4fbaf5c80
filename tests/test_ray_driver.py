"""`evaluate --ray`'s driver as a process: SIGTERM stops what it started and exits 143 in one
line; `--ray auto` joins only a cluster this user started, never one found through another
user's files or processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth import rayjoin
from blackbox_smooth.data import save_image

from .conftest import ROOT, messages

OTHER_UID = 65534  # nobody: a user other than the one running the tests

SLOW = """
import time
from pathlib import Path

import numpy as np

def f(x):
    Path({mark!r}).touch()  # the run has begun sending queries
    time.sleep(0.2)
    return np.zeros(len(x), dtype=np.int64)
"""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list) -> list:
    import psutil

    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.process
def test_sigterm_stops_the_cluster_the_driver_started_and_exits_143_in_one_line(tmp_path):
    pytest.importorskip("ray")  # make test installs it
    data = tmp_path / "data" / "0"
    data.mkdir(parents=True)
    for i in range(12):
        save_image(np.full((1, 8, 8), 0.5), data / f"{i}.png")
    mark = tmp_path / "asked"
    (tmp_path / "slow.py").write_text(SLOW.format(mark=str(mark)))
    # a fresh Ray folder (short: a session's socket paths must fit in 107 bytes) and "local":
    # the driver starts a cluster of its own whatever else runs on this machine
    ray_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_dir, "RAY_ADDRESS": "local"}
    args = ["evaluate", "--data", str(tmp_path / "data"), "-e", f"python:{tmp_path / 'slow.py'}:f",
            "--sigma", "0.25", "--n0", "20", "--n", "200", "--batch", "20", "--ray", "auto",
            "--workers", "1", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-m", "blackbox_smooth", *args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    started: list = []
    try:
        deadline = time.monotonic() + 240
        while not mark.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists(), driver.communicate(timeout=60)[1][-2000:]
        started = _descendants(driver.pid)  # its cluster: GCS, raylet, workers, …
        names = " ".join(" ".join(p.cmdline()[:1]) for p in _alive(started))
        assert "raylet" in names and "gcs_server" in names, names
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 143, err
        assert messages(err) == [
            "bbsmooth: error: terminated by SIGTERM: the Ray workers were stopped (the rows done "
            "are in the cache's journal: run the same command again to resume)"
        ], err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
        deadline = time.monotonic() + 60
        while _alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(started), [p.cmdline()[:1] for p in _alive(started)]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in _alive(started):  # only what this test's driver started
            p.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.fixture()
def ray_folder(tmp_path, monkeypatch):
    """Ray's shared folder in a temporary place, found as Ray finds it (RAY_TMPDIR)."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tmp_path / "ray"
    folder.mkdir()
    return folder


def _raylets(monkeypatch, mine: set[str], theirs: set[str]) -> None:
    monkeypatch.setattr(rayjoin, "_raylet_addresses", lambda: (set(mine), set(theirs)))


def _other_users(path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)


def test_auto_joins_the_cluster_this_user_recorded_and_serves(ray_folder, monkeypatch):
    (ray_folder / "ray_current_cluster").write_text("10.0.0.1:6379\n")
    assert rayjoin._recorded_address(str(ray_folder / "ray_current_cluster")) == (
        "10.0.0.1:6379", os.getuid(),
    )  # fmt: skip
    _raylets(monkeypatch, {"10.0.0.1:6379", "10.0.0.2:6379"}, set())
    assert rayjoin._own_cluster() == ("10.0.0.1:6379", None)  # the recorded one first
    (ray_folder / "ray_current_cluster").unlink()
    assert rayjoin._own_cluster() == ("10.0.0.1:6379", None)  # else a raylet of ours
    _raylets(monkeypatch, set(), set())
    assert rayjoin._own_cluster() == (None, None)  # none: start one
    (ray_folder / "ray_current_cluster").write_text("10.0.0.1:6379\n")
    assert rayjoin._own_cluster() == (None, None)  # our record of a cluster gone: the same


def test_auto_never_joins_through_another_users_file_or_raylet(ray_folder, monkeypatch):
    recorded = ray_folder / "ray_current_cluster"
    recorded.write_text("10.6.6.6:6379")
    _other_users(recorded)
    assert rayjoin._recorded_address(str(recorded)) == ("10.6.6.6:6379", OTHER_UID)
    # their file, even naming an address a raylet of theirs serves here
    _raylets(monkeypatch, set(), {"10.6.6.6:6379"})
    assert rayjoin._own_cluster() == (None, "10.6.6.6:6379")
    # our file naming a cluster that only their raylet serves (a stale address taken over)
    recorded.unlink()
    recorded.write_text("10.6.6.6:6379")
    assert rayjoin._own_cluster() == (None, "10.6.6.6:6379")
    # a link to a file of ours is not followed: whoever made the link chose the address
    recorded.unlink()
    (ray_folder / "elsewhere").write_text("10.0.0.1:6379")
    recorded.symlink_to(ray_folder / "elsewhere")
    assert rayjoin._recorded_address(str(recorded)) == (None, None)
    _raylets(monkeypatch, set(), set())
    assert rayjoin._own_cluster() == (None, None)


class _FakeRay:
    """What `_connect` asks of Ray: the calls to init, recorded."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def init(self, **kw: object) -> None:
        self.calls.append(kw)


def test_auto_starts_its_own_cluster_in_a_folder_of_its_own_and_says_why(
    ray_folder, monkeypatch, tmp_path, capsys
):
    recorded = ray_folder / "ray_current_cluster"
    recorded.write_text("10.6.6.6:6379")
    _other_users(recorded)
    _other_users(ray_folder)
    _raylets(monkeypatch, set(), {"10.6.6.6:6379"})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "private"))
    (tmp_path / "private").mkdir()
    authenticated: list[bool] = []
    monkeypatch.setattr(rayjoin, "_token_auth_as_found", lambda: authenticated.append(True))
    ray = _FakeRay()
    rayjoin.connect(ray, "auto")
    [call] = ray.calls
    assert call["address"] == "local" and call["_node_ip_address"] == "127.0.0.1"
    # Ray's shared folder is theirs: the sessions go to one only this user can write
    assert call["_temp_dir"] == str(tmp_path / "private" / f"ray-{os.getuid()}")
    assert (os.stat(call["_temp_dir"]).st_mode & 0o777) == 0o700
    assert messages(capsys.readouterr().err) == [
        "bbsmooth: warning: --ray auto: the Ray cluster at 10.6.6.6:6379 was found through "
        "another user's files or processes: not joined, starting one of our own"
    ]
    # ours: joined, in silence
    _raylets(monkeypatch, {"10.0.0.1:6379"}, set())
    ray = _FakeRay()
    rayjoin.connect(ray, "auto")
    assert [c["address"] for c in ray.calls] == ["10.0.0.1:6379"]
    assert capsys.readouterr().err == ""
    # the user's token goes, as with Ray's own auto, only to the cluster found and checked
    assert authenticated == [True]
    # RAY_ADDRESS is the user's own choice, as --ray ADDRESS is; "local" starts a new one
    for environment, address in (("ray://head:10001", "ray://head:10001"), ("local", "local")):
        monkeypatch.setenv("RAY_ADDRESS", environment)
        ray = _FakeRay()
        rayjoin.connect(ray, "auto")
        assert [c["address"] for c in ray.calls] == [address]
    assert authenticated == [True]
