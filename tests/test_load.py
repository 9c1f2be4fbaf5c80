"""Load: `bbsmooth evaluate` at --concurrency 64 against a loopback server, watched from outside
the process: every vote accounted for, connections within the pool and all closed at the end,
no file descriptor leak. (benchmarks/load.py runs 200 images × 2,000 and reports peak memory.)"""

from __future__ import annotations

import json
import time

import pytest
import torch

from blackbox_smooth.adapters import TorchModel
from blackbox_smooth.serve import InferenceServer

from .harness import watch, write_digits_folder

pytestmark = pytest.mark.process  # every test here starts a process of its own


def test_evaluate_at_concurrency_64_accounts_for_every_vote_and_leaks_nothing(
    digits_model, tmp_path
):
    data = write_digits_folder(tmp_path / "data", 16)
    model = TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))
    with InferenceServer(model, name="digits") as server:
        w = watch(["evaluate", "--data", data, "-e", server.url, "--sigma", "0.25", "--n0", "100",
                   "--n", "2000", "--out", tmp_path / "out", "--no-cache", "--batch", "50",
                   "--concurrency", "64"])  # fmt: skip
        assert w.returncode == 0, w.stderr
        deadline = time.monotonic() + 5
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.connections == 0  # every connection closed
        assert 8 <= server.peak_connections <= 64  # busy, and within the pool
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert server.images == summary["queries_sent"] == 16 * 2100  # no vote lost or doubled
        assert server.requests == 16 * (2 + 21 + 20)  # n0: 100 in 2; n: blocks of 1,024 and 976
    assert max(w.sockets) <= 64 + 4 and w.fd_growth <= 2
