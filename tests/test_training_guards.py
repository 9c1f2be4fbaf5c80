"""`bbsmooth train` does not spend in vain: a held-out split too small to tell a better epoch
from the start is refused before the first query, a start already right on every held-out
image is refused after its validation (both warnings with --force), and the closing hint is a
command that runs as printed."""

from __future__ import annotations

import shlex
import textwrap
from pathlib import Path

import numpy as np
import pytest

from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split

from .conftest import messages, run_cli


def _folder(root: Path, count: int) -> Path:
    x, _, _, _ = digits_split()
    root.mkdir()
    for i in range(count):
        save_image(x[i], root / f"{i:03d}.png")
    return root


def _counting(path: Path, body: str) -> str:
    """A python: endpoint that appends the size of every batch it is asked to `path`.log."""
    path.write_text(
        textwrap.dedent(f"""
        import numpy as np
        def f(x):
            with open({str(path) + ".log"!r}, "a") as log:
                log.write(f"{{len(x)}}\\n")
            {body}
        """)
    )
    return f"python:{path}:f"


def _asked(path: Path) -> int:
    log = Path(str(path) + ".log")
    return sum(int(n) for n in log.read_text().split()) if log.exists() else 0


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_too_few_held_out_images_are_refused_before_the_first_query(tmp_path):
    model = tmp_path / "m.py"
    endpoint = _counting(model, "return (x.reshape(len(x), -1).mean(1) > 0.15).astype(int)")
    data = _folder(tmp_path / "data", 30)  # --val-fraction 0.1: 3 held out
    common = ("train", "-e", endpoint, "--data", data, "--sigma", "0.5", "--no-cache",
              "--pretrain-epochs", "0", "--epochs", "1", "--max-queries", "400")  # fmt: skip
    refused = run_cli(*common, "--out", tmp_path / "run")
    assert refused.returncode == 2
    [line] = messages(refused.stderr)
    assert "holds out 3: too few to tell a better epoch" in line
    assert "hold out at least 10: 100 images in --data, or --val-fraction 0.33" in line
    assert "--force" in line
    assert _asked(model) == 0 and not (tmp_path / "run").exists()

    forced = run_cli(*common, "--out", tmp_path / "forced", "--force", "--confirm-draws", "0")
    assert forced.returncode == 0, forced.stderr
    assert "warning: --data has 30 images" in forced.stderr and "(--force)" in forced.stderr
    assert _asked(model) > 0


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_a_start_right_on_every_held_out_image_stops_after_its_validation(tmp_path):
    model = tmp_path / "m.py"
    endpoint = _counting(model, "return np.zeros(len(x), dtype=int)")  # one answer: all right
    data = _folder(tmp_path / "data", 100)  # 10 held out, 90 to train on
    run = tmp_path / "run"
    common = ("train", "-e", endpoint, "--data", data, "--sigma", "0.5", "--no-cache",
              "--pretrain-epochs", "0", "--epochs", "2", "--max-queries", "2000",
              "--frontend", "prompt", "--out", run)  # fmt: skip
    refused = run_cli(*common)
    assert refused.returncode == 2
    [line] = [m for m in messages(refused.stderr) if m.startswith("bbsmooth: error:")]
    assert messages(refused.stderr)[-1] == line
    assert "already answers all 10 held-out images right under all 4 noise draws" in line
    assert "--resume --force" in line
    # what it spent: the targets (the clean images) and the start's validation, nothing more
    assert _asked(model) == 100 + 10 * 4
    # the run is the validated start, and certifies
    image = next(data.iterdir())
    cert = run_cli("certify", image, "-e", endpoint, "--sigma", "0.5", "--frontend", run,
                   "--n", "100", "--no-cache")  # fmt: skip
    assert cert.returncode == 0, cert.stderr

    resumed = run_cli(*common, "--resume", "--force")
    assert resumed.returncode == 0, resumed.stderr
    assert _asked(model) > 100 + 10 * 4 + 100  # it trained this time


@pytest.mark.parametrize("extra", [(), ("--size", "28x28", "--grayscale")])
def test_the_closing_hint_is_a_command_that_runs_as_printed(tmp_path, digits_model, extra):
    data = _folder(tmp_path / "data", 12)
    cache = tmp_path / "my cache"  # a space: the hint quotes what it prints
    run = tmp_path / "run"
    trained = run_cli("train", "-e", f"torch:{digits_model}", "--data", data, "--sigma", "0.5",
                      "--objective", "mse", "--pretrain-epochs", "1", "--cache", cache,
                      "--out", run, *extra)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    hint = trained.stdout.strip().splitlines()[-1]
    assert "certify with: bbsmooth certify IMAGE " in hint
    words = shlex.split(hint.split("certify with: ", 1)[1])
    assert words[:3] == ["bbsmooth", "certify", "IMAGE"]
    for flag in ("--endpoint", "--sigma", "--frontend", "--cache", *extra):
        assert flag in words, (flag, hint)
    image = str(next(data.iterdir()))
    args = [image if w == "IMAGE" else w for w in words[1:]]
    cert = run_cli(*args, "--n", "100")
    assert cert.returncode == 0, cert.stderr
    assert np.isfinite(float(cert.stdout.splitlines()[1].split()[2]))  # the radius
