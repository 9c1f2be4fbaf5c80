"""Hostile and broken inputs: each gets one line naming the problem, a non-zero exit code, no
traceback, and leaves the cache and the output folder as they were. Unusual but valid images
(16-bit, CMYK, palette, alpha) are converted and certified."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli
from .harness import cache_rows


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height (a decompression bomb needs no pixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _image_bytes(mode: str, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((28, 28)) * 255).astype(np.uint8), "L")
    if mode == "I;16":
        image = Image.fromarray((rng.random((28, 28)) * 65535).astype(np.uint16))
    else:
        image = base.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _entries(cache: Path) -> dict[str, bytes]:
    """What a cache holds (SQLite may touch its files' bytes just by being opened)."""
    return {key: value for key, (_, value) in cache_rows(cache).items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, digits_model, digit_images):
    """Hostile and broken inputs, and a cache and an output folder that already hold a run."""
    root = tmp_path_factory.mktemp("hostile")
    files = {
        "empty.png": b"",
        "text.png": b"hello, I am not a picture\n",
        "truncated.png": _image_bytes("L")[:60],
        "bomb.png": _png_header(20_000, 20_000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    Image.new("L", (1, 1)).save(root / "tiny.png")
    for name, value in (("nan", "np.nan"), ("inf", "np.inf")):
        (root / f"{name}.py").write_text(
            f"import numpy as np\ndef f(x):\n    return np.full((len(x), 3), {value})\n"
        )
    (root / "dup.json").write_text('{"cat": "a", "CAT": "b"}')
    for folder in ("good", "data"):  # good images; the same and a broken one among them
        for i, path in enumerate(digit_images):
            (root / folder / str(i)).mkdir(parents=True)
            (root / folder / str(i) / path.name).write_bytes(path.read_bytes())
    (root / "data" / "0" / "zz-broken.png").write_bytes(files["truncated.png"])
    model = f"torch:{digits_model}"
    train = run_cli("train", "-e", model, "--data", root / "good", "--sigma", "0.5", "--out",
                    root / "fe", "--objective", "mse", "--pretrain-epochs", "1")  # fmt: skip
    assert train.returncode == 0, train.stderr
    cache, out = root / "cache", root / "out"
    ok = run_cli("evaluate", "--data", root / "good", "-e", model, "--sigma", "0.25", "--n", "100",
                 "--cache", cache, "--out", out)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    return root, model


C = ["--sigma", "0.25", "--n", "100"]
HOSTILE = {
    "empty file": (["certify", "empty.png", "-e", "{model}", *C], "not an image"),
    "text file named .png": (["certify", "text.png", "-e", "{model}", *C], "not an image"),
    "truncated PNG": (["certify", "truncated.png", "-e", "{model}", *C], "could not be decoded"),
    "20,000×20,000 header": (["certify", "bomb.png", "-e", "{model}", *C], "too large to decode"),
    "1×1 image": (["certify", "tiny.png", "-e", "{model}", *C], "--size"),
    "NaN from a callable": (["certify", "tiny.png", "-e", "python:{root}/nan.py:f", *C], "NaN"),
    "inf from a callable": (["certify", "tiny.png", "-e", "python:{root}/inf.py:f", *C], "infinite"),
    "front end for another σ": (
        ["certify", "good/1/{one}", "-e", "{model}", *C, "--frontend", "fe"], "--force"),
    "front end for another size": (
        ["certify", "good/1/{one}", "-e", "{model}", "--sigma", "0.5", "--size", "14x14",
         "--frontend", "fe"], "--force"),
    "label map with duplicates": (
        ["certify", "good/1/{one}", "-e", "http://127.0.0.1:9/predictions/digits", *C,
         "--labels", "dup.json"], "two classes"),
    "URL with credentials": (
        ["certify", "good/1/{one}", "-e", "http://user:hunter2@127.0.0.1:9/v2/models/m/infer", *C],
        "holds credentials"),
    "broken image in a data set": (
        ["evaluate", "--data", "data", "-e", "{model}", *C, "--out", "out"], "could not be decoded"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_gets_one_line_exit_2_and_changes_nothing(case, corpus, digit_images):
    root, model = corpus
    args, says = HOSTILE[case]
    one = digit_images[1].name
    args = [a.format(model=model, root=root, one=one) for a in args]
    args = [str(root / a) if (root / a).exists() else a for a in args]
    args += ["--cache", str(root / "cache")]
    before = _entries(root / "cache"), _snapshot(root / "out"), _snapshot(root / "fe")
    r = run_cli(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bbsmooth: error:"), r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr and "hunter2" not in r.stderr
    assert (_entries(root / "cache"), _snapshot(root / "out"), _snapshot(root / "fe")) == before
    assert len(before[0]) > 0 and len(before[1]) >= 3


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                           ("RGBA", "PNG"), ("LA", "PNG")])  # fmt: skip
def test_unusual_valid_images_are_converted_and_certified(mode, fmt, digits_model, tmp_path):
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_image_bytes(mode, fmt))
    r = run_cli("certify", path, "-e", f"torch:{digits_model}", "--sigma", "0.25", "--n", "100",
                "--grayscale", "--json", "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 100


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, digits_model, digit_images):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / "frontend.safetensors").write_bytes(pickle.dumps(Evil()))
    (run / "frontend.json").write_text(
        json.dumps({"kind": "denoiser", "channels": 1, "height": 28, "width": 28, "sigma": 0.25})
    )
    r = run_cli("certify", digit_images[0], "-e", f"torch:{digits_model}", "--sigma", "0.25",
                "--frontend", run)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--labels", "map.json"),
        ("--protocol", "kserve"),
        ("--protocol-config", "config.json"),
        ("--top-k", "3"),
        ("--auth", "bearer"),
        ("--ca-bundle", "ca.pem"),
    ],
)
def test_a_flag_of_http_endpoints_is_refused_for_a_local_model(
    flag, value, digits_model, digit_images, tmp_path
):
    """It would be silently ignored: the user would believe a label map or a protocol applied."""
    for name in ("map.json", "config.json", "ca.pem"):
        (tmp_path / name).write_text("{}")
    value = str(tmp_path / value) if value.endswith((".json", ".pem")) else value
    cache = tmp_path / "cache"
    r = run_cli(
        "certify", str(digit_images[0]), "-e", f"torch:{digits_model}", "--sigma", "0.5",
        "--n", "100", "--cache", str(cache), flag, value,
    )  # fmt: skip
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"bbsmooth: error: {flag} says how to speak to an http(s)")
    assert "drop it" in lines[0] and "Traceback" not in r.stderr
    assert cache_rows(cache) == {}
