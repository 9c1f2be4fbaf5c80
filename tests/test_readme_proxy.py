"""The README's `bbsmooth proxy` example, run as it is written: two servers and a curl call, in a
folder holding the demo's model and a digit."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.process  # every test here starts a process of its own

MARKER = "<!-- proxy-snippet:"


def snippet() -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(MARKER) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block, "the README's proxy example has no bash block after its marker"
    return block[1]


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_readmes_proxy_example_runs(digits_model, digit_images, tmp_path):
    script = snippet()
    for port in (8000, 8080):  # a machine with these ports taken runs it on others
        if _busy(port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                script = script.replace(f":{port}", f":{s.getsockname()[1]}")
                script = script.replace(f"--port {port}", f"--port {s.getsockname()[1]}")
    (tmp_path / ".demo").mkdir()
    shutil.copy(digits_model, tmp_path / ".demo" / "digits_cnn.pt")
    shutil.copy(digit_images[0], tmp_path / "digit.png")
    bin_dir = str(Path(sys.executable).parent)  # where `bbsmooth` is installed
    done = subprocess.run(
        ["bash", "-c", script + "\nstatus=$?\nkill $(jobs -p) 2>/dev/null\nwait\nexit $status"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.splitlines()[-1])
    truth = int(digit_images[0].stem.rsplit("_", 1)[1])
    assert answer["label"] == truth and answer["radius"] > 0 and answer["n"] == 2000
    assert answer["fresh"] is True and answer["queries_sent"] == 2100
