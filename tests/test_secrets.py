"""Secrets: with an API key in the environment, every command runs against a vendor server that
echoes the key (in its URL, from the query string where Cloud Vision takes it) in its error
bodies, on a schedule of retried quota errors and then persistently. The key appears nowhere:
not in stdout or stderr, the cache, checkpoints, reports or plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from blackbox_smooth.data import save_image

from .conftest import run_cli
from .test_vendors import KEY, digit, label_map
from .vendors import VendorServer

QUOTA_EVERY_FIFTH = {i: "quota" for i in range(0, 10_000, 5)}


def _files(*folders: Path) -> bytes:
    return b"".join(p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file())


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_no_command_leaks_a_key_that_the_server_echoes(tmp_path):
    data = tmp_path / "data"
    for i in range(12):
        (data / str(digit(i)[1])).mkdir(parents=True, exist_ok=True)
        save_image(digit(i)[0], data / str(digit(i)[1]) / f"{i}.png")
    image = next(data.rglob("*.png"))
    cache, run, out = tmp_path / "cache", tmp_path / "run", tmp_path / "out"
    env = {"VISION_KEY": KEY}
    labels = label_map(tmp_path, "gcv")
    wire = ["--api-key-env", "VISION_KEY", "--labels", labels, "--retries", "10"]
    common = [*wire, "--cache", cache]
    smooth = ["--sigma", "0.25", "--n0", "16", "--n", "64", "--alpha", "0.01"]
    with VendorServer("gcv", key=KEY, faults=QUOTA_EVERY_FIFTH, echo_key=True) as server:
        e = ["-e", server.url]
        runs = [
            run_cli("labels", image, *e, *wire, env=env),
            run_cli("certify", image, *e, *common, *smooth, "--json", env=env),
            run_cli("predict", image, *e, *common, "--sigma", "0.25", "--n", "64", env=env),
            run_cli(
                "evaluate",
                "--data",
                data,
                *e,
                *common,
                *smooth,
                "--out",
                out,
                "--limit",
                "3",
                "--price-per-1000",
                "1.5",
                env=env,
            ),  # fmt: skip
            run_cli(
                "train",
                "--force",  # 12 images: validation is not the point
                "--data",
                data,
                *e,
                *common,
                "--sigma",
                "0.25",
                "--out",
                run,
                "--max-queries",
                "300",
                "--epochs",
                "1",
                "--pretrain-epochs",
                "1",
                env=env,
            ),  # fmt: skip
            run_cli(
                "certify", image, *e, *common, *smooth, "--frontend", run, "--dry-run", env=env
            ),
        ]
        assert server.requests > 20  # the quota errors, with the key in them, were met and retried
    for r in runs:
        assert r.returncode == 0, r.stderr
    runs.append(run_cli("plot", out / "certify.tsv", "--out", tmp_path / "fig.png"))
    with VendorServer(
        "gcv", key=KEY, faults=dict.fromkeys(range(100), "quota"), echo_key=True
    ) as s:
        failed = run_cli("certify", image, "-e", s.url, *wire[:-2], "--retries", "2", *smooth,
                         "--no-cache", env=env)  # fmt: skip
    assert failed.returncode == 3 and "***" in failed.stderr  # the vendor's words, key scrubbed
    for r in [*runs, failed]:
        assert KEY not in r.stdout + r.stderr
    stored = _files(cache, run, out) + (tmp_path / "fig.png").read_bytes()
    assert len(stored) > 10_000 and KEY.encode() not in stored
