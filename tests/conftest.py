"""Shared fixtures: real files, a real model, a real HTTP server on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.data import save_image
from blackbox_smooth.demo import digits_split, train_digits_model
from blackbox_smooth.serve import InferenceServer

from .harness import write_digits_folder  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.fixture()
def server(digits_model):
    """A fresh Open Inference Protocol server for the digits model on 127.0.0.1."""
    model = TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))
    with InferenceServer(model, name="digits") as s:
        yield s


def write_linear(path: Path, w: np.ndarray, b: float) -> str:
    path.write_text(textwrap.dedent(LINEAR_SOURCE.format(w=list(map(float, w)), b=float(b))))
    return f"python:{path}:f"


def run_cli(
    *args: str, timeout: float = 240, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`bbsmooth ARGS…` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "BBSMOOTH_CACHE": os.environ.get("BBSMOOTH_CACHE", ""), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "blackbox_smooth", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


@pytest.fixture(autouse=True)
def _isolated_user_cache(tmp_path, monkeypatch):
    """Never touch the real user cache from tests."""
    monkeypatch.setenv("BBSMOOTH_CACHE", str(tmp_path / "user-cache"))
