"""`make demo` as a newcomer meets it: a rerun on a busy port finds its cache, a stale run of an
earlier demo is trained again rather than refused. A small plan (3 digits, n = 100, one epoch)
with the demo's real parts: the CNN, `bbsmooth serve` in a process of its own, the cache."""

from __future__ import annotations

import json
import re
import shutil
import socket

import pytest

from blackbox_smooth import demo
from blackbox_smooth.serve import free_port


def _plan(tmp_path, port: int) -> demo.Plan:
    return demo.Plan(folder=tmp_path / ".demo", count=3, n=100, max_queries=2_500, epochs=1,
                     pretrain_epochs=1, passes=1, port=port)  # fmt: skip


def _sent(out: str) -> tuple[int, int]:
    """(training queries sent now, certification queries sent now), from what the demo prints."""
    training = re.search(r"queries \(([\d,]+) sent now\)", out)
    certification = re.search(r"certification: ([\d,]+) queries sent now", out)
    assert training and certification, out
    return int(training[1].replace(",", "")), int(certification[1].replace(",", ""))


@pytest.mark.process
@pytest.mark.slow
def test_demo_rerun_on_a_busy_port_sends_nothing_and_a_stale_run_is_redone(
    tmp_path, capsys, digits_model
):
    # the session's CNN in the demo's cache, rather than training the demo's own again
    shutil.copytree(digits_model.parent, tmp_path / ".demo")
    port = free_port()
    demo.main(_plan(tmp_path, port))
    first = capsys.readouterr()
    assert f"127.0.0.1:{port}/" in first.out
    trained, certified = _sent(first.out)
    assert trained > 0 and certified > 0

    with socket.socket() as busy:  # the port the first run used is taken now
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        busy.bind(("127.0.0.1", port))
        busy.listen()
        demo.main(_plan(tmp_path, port))
    again = capsys.readouterr()
    assert f"127.0.0.1:{port}/" not in again.out  # served elsewhere …
    # … and every answer came from the cache, but for the canary: 8 cached samples asked again
    # before each of the three certification runs replays its answers
    assert _sent(again.out) == (0, 24), again.out
    assert "error" not in again.err

    # a run left by an older demo (another σ) is the demo's own: trained again, not refused
    settings = tmp_path / ".demo" / "frontend" / "frontend.json"
    config = json.loads(settings.read_text())
    settings.write_text(json.dumps({**config, "sigma": 0.25}))
    demo.main(_plan(tmp_path, free_port()))
    redone = capsys.readouterr()
    assert "is from an earlier demo" in redone.err and "σ 0.25 (now 0.5)" in redone.err
    assert json.loads(settings.read_text())["sigma"] == 0.5
    assert _sent(redone.out)[1] == 24  # certification replays (the retrained run is the same)
