"""`evaluate --ray` on a local Ray cluster started by the tests (127.0.0.1, 2 CPUs, no
dashboard): the same TSV as one machine, one budget for the cluster counted at the model, a
killed worker and an interrupted driver that change nothing in the rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blackbox_smooth import jobs
from blackbox_smooth.cache import RECORD
from blackbox_smooth.options import (
    CertifyOptions,
    ClusterOptions,
    DatasetOptions,
    EndpointOptions,
    SmoothingOptions,
)
from blackbox_smooth.serve import InferenceServer

from .conftest import ROOT, messages, run_cli
from .harness import cache_rows

SAME = ["idx", "label", "predict", "radius", "correct", "queries"]  # all but time, sent, fresh


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for this module's tests; its address, for drivers in other processes."""
    try:
        import ray
    except ImportError:  # `make test` installs it: a missing Ray is a broken setup, not a skip
        pytest.fail("Ray is not installed: `make test` installs it into .venv")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _columns(tsv: Path) -> list[list[str]]:
    lines = tsv.read_text().splitlines()
    head = lines[0].split("\t")
    keep = [head.index(c) for c in SAME]
    return [[row.split("\t")[k] for k in keep] for row in lines[1:]]


def _evaluate(url: str, data: Path, out: Path, *more: str, limit: int = 6) -> object:
    return run_cli("evaluate", "--data", data, "--limit", str(limit), "--out", out, "-e", url,
                   "--sigma", "0.5", "--n0", "20", "--n", "200", "--batch", "55", *more)  # fmt: skip


@pytest.mark.process
def test_ray_gives_the_tsv_of_one_machine(ray_cluster, digits_torch, digits_60, tmp_path):
    with InferenceServer(digits_torch, name="digits") as server:
        alone = _evaluate(server.url, digits_60, tmp_path / "alone", "--no-cache")
        assert alone.returncode == 0, alone.stderr
        for workers in ("1", "2"):
            spread = _evaluate(server.url, digits_60, tmp_path / workers, "--ray", "auto",
                               "--workers", workers, "--cache", tmp_path / f"cache{workers}")  # fmt: skip
            assert spread.returncode == 0, spread.stderr
            assert _columns(tmp_path / workers / "certify.tsv") == _columns(
                tmp_path / "alone" / "certify.tsv"
            )
            assert "queries: 1,320 sent" in spread.stdout  # 6 × 220, sent by the workers


@pytest.mark.process
def test_max_queries_holds_for_the_whole_cluster(ray_cluster, digits_torch, digits_60, tmp_path):
    with InferenceServer(digits_torch, name="digits") as server:
        r = _evaluate(server.url, digits_60, tmp_path / "out", "--ray", "auto", "--workers", "2",
                      "--max-queries", "700", "--no-cache")  # fmt: skip
        assert r.returncode == 4, r.stderr  # 6 images need 1,320
        assert "--max-queries 700" in r.stderr and "Traceback" not in r.stderr
        assert len(messages(r.stderr)) == 1
        assert server.images <= 700  # counted at the model: never past the cluster's budget
        # (700 per worker would have let all 6 through); a budget that suffices is all spent
        r = _evaluate(server.url, digits_60, tmp_path / "out", "--ray", "auto", "--workers", "2",
                      "--max-queries", "1320", "--no-cache")  # fmt: skip
        assert r.returncode == 0, r.stderr


class _Clocked(InferenceServer):
    """Notes when each inference request arrives."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.arrivals: list[float] = []

    async def before_answer(self, index: int, body: bytes, request: object) -> None:
        self.arrivals.append(time.monotonic())


@pytest.mark.process
def test_rps_holds_for_the_whole_cluster(ray_cluster, digits_torch, digits_60, tmp_path):
    """4 images × 5 requests at --rps 10 over 2 workers: starts 0.1 s apart cluster-wide, so
    the last starts 1.9 s after the first (2 workers at 10 rps each: 0.9 s)."""
    with _Clocked(digits_torch, name="digits") as server:
        r = _evaluate(server.url, digits_60, tmp_path / "out", "--ray", "auto", "--workers", "2",
                      "--rps", "10", "--concurrency", "4", "--no-cache", limit=4)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert len(server.arrivals) == 20
    # a lower bound only (a slow machine makes it longer, never shorter); the margin is for the
    # first request's own way to the server
    assert server.arrivals[-1] - server.arrivals[0] >= 1.5


@pytest.mark.process
def test_a_killed_worker_costs_only_its_requests_in_flight(
    ray_cluster, digits_torch, digits_60, tmp_path
):
    concurrency = 4
    with InferenceServer(digits_torch, name="digits", delay=0.05) as server:
        plain = SmoothingOptions(server.url, 0.5, no_cache=True,
                                 wire=EndpointOptions(batch=55, concurrency=concurrency))  # fmt: skip
        dataset = DatasetOptions(digits_60, limit=6)
        plan = CertifyOptions(n0=20, n=200)
        jobs.evaluate(plain, dataset, tmp_path / "alone", plan)
        alone = server.images

        server.images = 0
        cached = SmoothingOptions(server.url, 0.5, cache=tmp_path / "cache",
                                  wire=EndpointOptions(batch=55, concurrency=concurrency))  # fmt: skip
        cluster = ClusterOptions(ray="auto", workers=2)
        done: list[BaseException | None] = []

        def run() -> None:
            try:
                jobs.evaluate(cached, dataset, tmp_path / "spread", plan, cluster=cluster)
                done.append(None)
            except BaseException as e:  # noqa: BLE001 -- reported by the assertion below
                done.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while server.images < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        victims = _worker_pids()
        assert victims, "no Ray worker process found"
        os.kill(victims[0], signal.SIGKILL)
        assert thread.is_alive()  # killed mid-run
        thread.join(timeout=300)
        assert done == [None], done
    assert _columns(tmp_path / "spread" / "certify.tsv") == _columns(
        tmp_path / "alone" / "certify.tsv"
    )
    # what the killed worker had in flight, at most, was asked again; nothing else
    assert alone <= server.images <= alone + concurrency * 55


def _worker_pids() -> list[int]:
    """The processes of our Ray workers (Ray titles an actor's process ray::CLASS)."""
    found = subprocess.run(["pgrep", "-f", "ray::Worker"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _recorded_rows(directory: Path) -> int:
    """The rows a driver has recorded in the journal of the cache at `directory` so far."""
    return sum(kind == RECORD for kind, _ in cache_rows(directory).values())


@pytest.mark.process
def test_an_interrupted_driver_skips_what_it_recorded(
    ray_cluster, digits_torch, digits_60, tmp_path
):
    with InferenceServer(digits_torch, name="digits") as server:
        reference = _evaluate(server.url, digits_60, tmp_path / "alone", "--no-cache",
                              "--concurrency", "4")  # fmt: skip
        assert reference.returncode == 0
        alone = server.images
        server.images, server.delay = 0, 1.0  # the rest of the run: seconds, not one
        args = ["evaluate", "--data", str(digits_60), "--limit", "6", "--out",
                str(tmp_path / "spread"), "-e", server.url, "--sigma", "0.5", "--n0", "20", "--n",
                "200", "--batch", "55", "--ray", ray_cluster, "--workers", "2", "--cache",
                str(tmp_path / "cache"), "--concurrency", "4"]  # fmt: skip
        # a shell that started the suite in the background leaves SIGINT ignored in its
        # children: give the driver the default, as a terminal would
        with subprocess.Popen([sys.executable, "-m", "blackbox_smooth", *args], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                              ) as driver:  # fmt: skip
            # interrupted once the driver has recorded a row: the server's count alone can run
            # ahead of the driver, which records an image only when its answer comes back
            deadline = time.monotonic() + 120
            while _recorded_rows(tmp_path / "cache") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            driver.send_signal(signal.SIGINT)
            _, err = driver.communicate(timeout=60)
        assert driver.returncode == 130, err
        first = server.images
        assert first < alone  # stopped before the end
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert "certified by an earlier run of this evaluation" in again.stderr
    # the rows recorded are not certified again: the two runs ask what one would, plus at most
    # what was in flight when the driver stopped (answered blocks replay from the cache)
    assert server.images <= alone + 2 * 220
    assert _columns(tmp_path / "spread" / "certify.tsv") == _columns(
        tmp_path / "alone" / "certify.tsv"
    )


def test_without_ray_installed_one_line_says_how(monkeypatch, digits_60, digits_model, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    r = run_cli("evaluate", "--data", digits_60, "--out", tmp_path / "o", "-e",
                f"torch:{digits_model}", "--sigma", "0.5", "--ray", "auto")  # fmt: skip
    assert r.returncode == 2 and len(messages(r.stderr)) == 1
    assert "pip install 'blackbox_smooth[ray]'" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.process
def test_without_the_flag_ray_is_not_imported(tmp_path, digits_60):
    """evaluate without --ray, in a fresh interpreter: Ray never loads (its import is slow and
    it may not be installed)."""
    model = tmp_path / "m.py"
    model.write_text("import numpy as np\ndef f(x):\n    return np.zeros(len(x), dtype=np.int64)\n")
    code = (
        "import sys\nfrom blackbox_smooth.cli import main\n"
        f"sys.argv = ['bbsmooth', 'evaluate', '--data', {str(digits_60)!r}, '--limit', '2', "
        f"'--out', {str(tmp_path / 'out')!r}, '-e', 'python:{model}:f', '--sigma', '0.5', "
        "'--n0', '5', '--n', '20']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('ray' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
