"""Shared fixtures: real files, a real model, a real HTTP server on loopback."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split, train_digits_model
from blackbox_smooth.serve import InferenceServer

from .harness import cli, write_digits_folder

ROOT = Path(__file__).resolve().parent.parent

# Fixtures that start a process of their own (a server, a cluster, `bbsmooth` runs): a test
# that uses one must be marked `process` (`pytestmark = pytest.mark.process` or a decorator),
# which keeps it out of `make test-fast`. A test that starts one in its body is marked the
# same way by hand; nothing is guessed from its text.
PROCESS_FIXTURES = {"mlserver", "triton", "home", "cli_results", "ray_cluster", "small_server"}


# Under pytest-xdist with --dist loadgroup (`pytest -n 2 --dist loadgroup`), each module stays on
# one worker, so its module fixtures (servers, the hostile cases) start once, and the modules
# that start a local Ray share one worker: two Ray clusters at once on 2 cores starve each other.
RAY_MODULES = {"test_ray.py", "test_proxy_ray.py", "test_ray_driver.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_MODULES else name))
    unmarked = [
        item.nodeid
        for item in items
        if set(getattr(item, "fixturenames", ())) & PROCESS_FIXTURES
        and item.get_closest_marker("process") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"{len(unmarked)} test(s) use a fixture that starts a process "
            f"({', '.join(sorted(PROCESS_FIXTURES))}) but are not marked `process`: "
            f"{', '.join(unmarked[:5])}"
        )


LINEAR_SOURCE = """
import numpy as np

W = np.array({w}, dtype=np.float64)
B = {b}

def f(x):
    # x: float32 N×C×H×W, noisy and unclipped
    return (x.reshape(len(x), -1).astype(np.float64) @ W + B > 0).astype(np.int64)
"""


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """The demo's black box: a small CNN on 28×28 digits, as a TorchScript file."""
    return train_digits_model(tmp_path_factory.mktemp("model"), epochs=4)


@pytest.fixture(scope="session")
def digit_images(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("digits")
    _, _, x_te, y_te = digits_split()
    paths = []
    for i in range(4):
        p = out / f"d{i}_{y_te[i]}.png"
        save_image(x_te[i], p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def digits_torch(digits_model) -> TorchModel:
    """The digits model loaded in-process, to serve behind a loopback server."""
    return TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))


@pytest.fixture(scope="session")
def digits_60(tmp_path_factory) -> Path:
    """60 held-out digits as PNGs, one sub-folder per class."""
    return write_digits_folder(tmp_path_factory.mktemp("digits60"), 60)


@pytest.fixture()
def server(digits_torch):
    """A fresh Open Inference Protocol server for the digits model on 127.0.0.1."""
    with InferenceServer(digits_torch, name="digits") as s:
        yield s


def write_linear(path: Path, w: np.ndarray, b: float) -> str:
    path.write_text(textwrap.dedent(LINEAR_SOURCE.format(w=list(map(float, w)), b=float(b))))
    return f"python:{path}:f"


def run_cli(
    *args: str, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`bbsmooth ARGS…` in this process (tests/harness.cli): exit code, stdout and stderr as a
    user sees them. Tests where the process is the point (signals, kills, memory limits, the
    entry point itself) call `bbsmooth`, which starts one. `timeout` is for those callers'
    symmetry: in-process runs are bounded by pytest-timeout."""
    return cli(list(args), env)


def messages(stderr: str) -> list[str]:
    """stderr's lines less the progress lines that a run longer than a few seconds writes
    (they start with two spaces): what a one-line error must be alone in."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("  ")]


@pytest.fixture(autouse=True)
def _isolated_user_cache(tmp_path, tmp_path_factory, monkeypatch):
    """Never touch the real user cache or evidence ledger from tests: each test has its own
    (the ledger outside tmp_path, which some tests list)."""
    monkeypatch.setenv("BBSMOOTH_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setenv("BBSMOOTH_LEDGER", str(tmp_path_factory.mktemp("ledger")))
