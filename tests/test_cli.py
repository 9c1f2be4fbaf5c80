"""`bbsmooth` as a user runs it: output formats, exit codes, one-line errors."""

import json

import pytest

from .conftest import messages, run_cli, write_linear
from .harness import bbsmooth

JSON_KEYS = {
    "image", "label", "abstain", "radius", "p_lower", "n0", "n", "alpha", "sigma", "seed",
    "counts", "max_radius", "queries_sent", "queries_cached", "seconds",
}  # fmt: skip


def test_certify_json_over_http(server, digit_images):
    r = run_cli(
        "certify", *digit_images[:2], "--endpoint", server.url, "--sigma", "0.25",
        "--n", "500", "--json", "--no-cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 2 and set(lines[0]) >= JSON_KEYS
    for rec, path in zip(lines, digit_images, strict=False):
        assert rec["image"] == str(path)
        assert isinstance(rec["label"], int) and isinstance(rec["abstain"], bool)
        assert sum(rec["counts"].values()) == 500 and all(isinstance(k, str) for k in rec["counts"])
        assert rec["queries_sent"] == 600 and rec["queries_cached"] == 0
        true_label = int(path.stem.split("_")[1])
        assert rec["label"] in (true_label, -1)
        assert rec["radius"] <= rec["max_radius"]


def test_certify_table_and_predict(server, digit_images):
    r = run_cli(
        "certify", digit_images[0], "--endpoint", server.url, "--sigma", "0.25",
        "--n", "300", "--no-cache",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    head, row, total = r.stdout.splitlines()
    assert head.split()[:3] == ["image", "label", "radius"] and row.startswith(digit_images[0].name)
    assert total == "queries: 400 sent, 0 replayed from cache"
    p = run_cli(
        "predict", digit_images[0], "--endpoint", server.url, "--sigma", "0.25",
        "--n", "200", "--json", "--no-cache",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["label"] == int(digit_images[0].stem.split("_")[1]) and rec["queries_sent"] == 200


def test_max_queries_exits_4_before_sending(server, digit_images, tmp_path):
    r = run_cli(
        "certify", digit_images[0], "--endpoint", server.url, "--sigma", "0.25",
        "--n", "1000", "--max-queries", "999", "--cache", tmp_path / "c",
    )  # fmt: skip
    assert r.returncode == 4 and server.images == 0
    assert len(messages(r.stderr)) == 1 and "--max-queries" in r.stderr
    ok = run_cli(
        "certify", digit_images[0], "--endpoint", server.url, "--sigma", "0.25",
        "--n", "1000", "--max-queries", "1100", "--cache", tmp_path / "c", "--json",
    )  # fmt: skip
    assert ok.returncode == 0 and server.images == 1100


def test_local_python_endpoint(tmp_path):
    import numpy as np

    from blackbox_smooth.data import save_image

    spec = write_linear(tmp_path / "lin.py", np.ones(4), -1.0)
    img = tmp_path / "x.png"
    save_image(np.full((1, 2, 2), 0.8), img)
    r = run_cli("certify", img, "--endpoint", spec, "--sigma", "0.5", "--n", "2000", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    exact = (4 * round(0.8 * 255) / 255 - 1.0) / 2.0  # |w·x + b| / ‖w‖
    assert rec["label"] == 1 and 0 < rec["radius"] <= exact


@pytest.fixture()
def not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is text, not a PNG")
    return p


BAD = {
    "missing file": (["certify", "missing.png", "-e", "torch:{model}", "--sigma", "0.25"], 2, "not found"),
    "non-image": (["certify", "{bad}", "-e", "torch:{model}", "--sigma", "0.25"], 2, "not an image"),
    "unknown scheme": (["certify", "{img}", "-e", "ftp://host/m", "--sigma", "0.25"], 2, "unknown endpoint"),
    "sigma zero": (["certify", "{img}", "-e", "torch:{model}", "--sigma", "0"], 2, "--sigma"),
    "sigma negative": (["certify", "{img}", "-e", "torch:{model}", "--sigma=-1"], 2, "--sigma"),
    "n0 zero": (["certify", "{img}", "-e", "torch:{model}", "--sigma", "0.25", "--n0", "0"], 2, "--n0"),
    "alpha one": (["certify", "{img}", "-e", "torch:{model}", "--sigma", "0.25", "--alpha", "1"], 2, "--alpha"),
    "alpha zero": (["predict", "{img}", "-e", "torch:{model}", "--sigma", "0.25", "--alpha", "0"], 2, "--alpha"),
    "missing option": (["certify", "{img}", "--sigma", "0.25"], 2, "--endpoint"),
    "no model file": (["certify", "{img}", "-e", "torch:nope.pt", "--sigma", "0.25"], 2, "not found"),
    "unreachable host": (
        ["certify", "{img}", "-e", "http://127.0.0.1:9/v2/models/m/infer", "--sigma", "0.25",
         "--retries", "2", "--no-cache", "--n", "10"],
        3, "is the server up",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_line_and_exit_code(case, digit_images, not_an_image, digits_model):
    args, code, words = BAD[case]
    args = [a.format(bad=not_an_image, img=digit_images[0], model=digits_model) for a in args]
    r = run_cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbsmooth: error:"), r.stderr
    assert words in lines[0] and "Traceback" not in r.stderr
    assert r.stdout.strip() in ("", "queries: 0 sent, 0 replayed from cache")


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "certify" in r.stdout and "predict" in r.stdout


HELP_IMPORTS = """
import contextlib, io, sys
from blackbox_smooth import cli
sys.argv = ["bbsmooth", "--help"]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        cli.main()
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "peft", "transformers", "numpy", "scipy", "httpx")
             if m in sys.modules))
"""


@pytest.mark.process
def test_help_imports_none_of_the_heavy_libraries():
    """Why `--help` is fast, checked without a clock (machines are noisy; the time itself is
    in benchmarks/cli_startup.py): it loads neither torch nor peft nor numpy."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.process
def test_python_module_endpoint(tmp_path):
    import numpy as np

    from blackbox_smooth.data import save_image

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import numpy as np\ndef scores(x):\n"
        "    s = x.reshape(len(x), -1).mean(axis=1)\n"
        "    return np.stack([1 - s, s], axis=1)\n"
    )
    img = tmp_path / "bright.png"
    save_image(np.full((1, 4, 4), 0.9), img)
    # a process of its own: PYTHONPATH is read when the interpreter starts
    r = bbsmooth(
        ["predict", img, "--endpoint", "python:mypkg.models:scores", "--sigma", "0.25",
         "--n", "300", "--json"], env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] == 1
    bad = run_cli("predict", img, "-e", "python:mypkg.nope:f", "--sigma", "0.25",
                  env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert bad.returncode == 2 and "could not import module mypkg.nope" in bad.stderr
