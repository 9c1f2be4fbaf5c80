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


BROKEN = {
    "empty.png": (b"", "not an image"),
    "text.png": (b"hello, I am not a picture\n", "not an image"),
    "truncated.png": (_image_bytes("L")[:60], "could not be decoded"),
    "bomb.png": (_png_header(20_000, 20_000), "too large to decode safely"),
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_get_one_line_and_exit_2(name, digits_model, tmp_path):
    data, says = BROKEN[name]
    path = tmp_path / name
    path.write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    before = _snapshot(cache)
    r = run_cli("certify", path, "-e", f"torch:{digits_model}", "--sigma", "0.25", "--cache", cache)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bbsmooth: error:")
    assert says in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
    assert _snapshot(cache) == before


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"),
                                           ("RGBA", "PNG"), ("LA", "PNG")])  # fmt: skip
def test_unusual_valid_images_are_converted_and_certified(mode, fmt, digits_model, tmp_path):
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_image_bytes(mode, fmt))
    r = run_cli("certify", path, "-e", f"torch:{digits_model}", "--sigma", "0.25", "--n", "100",
                "--grayscale", "--json", "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 100


def test_an_image_of_the_wrong_size_names_the_model_failure(digits_model, tmp_path):
    path = tmp_path / "one.png"
    Image.new("L", (1, 1)).save(path)
    r = run_cli("certify", path, "-e", f"torch:{digits_model}", "--sigma", "0.25", "--no-cache")
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "failed on a batch" in r.stderr


def test_a_callable_returning_nan_is_refused(tmp_path):
    src = tmp_path / "nan.py"
    src.write_text("import numpy as np\ndef f(x):\n    return np.full((len(x), 3), np.nan)\n")
    image = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(image)
    r = run_cli("certify", image, "-e", f"python:{src}:f", "--sigma", "0.25", "--no-cache")
    assert r.returncode == 3 and "NaN" in r.stderr and r.stderr.count("\n") == 1


def test_a_pickled_checkpoint_is_never_unpickled(tmp_path, digits_model, digit_images):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / "frontend.safetensors").write_bytes(pickle.dumps(Evil()))
    (run / "config.json").write_text(
        json.dumps({"kind": "denoiser", "channels": 1, "height": 28, "width": 28, "sigma": 0.25})
    )
    r = run_cli("certify", digit_images[0], "-e", f"torch:{digits_model}", "--sigma", "0.25",
                "--frontend", run)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not marker.exists()
