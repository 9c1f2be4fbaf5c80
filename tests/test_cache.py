"""The disk cache: replays cost nothing, interrupted runs resume, damaged entries are redone."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.adapters.local import TorchModel
from blackbox_smooth.blackbox import OTHER, Answer
from blackbox_smooth.cache import TABLE, BlockCache, Seal, decode, encode
from blackbox_smooth.data import load_image
from blackbox_smooth.serve import InferenceServer
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.stats import ABSTAIN

from .conftest import ROOT, run_cli
from .harness import cache_rows


def test_other_is_minus_one_on_disk_and_an_old_cache_reads_as_other():
    """The cache's format keeps -1 for OTHER (as every bbsmooth wrote it); in memory OTHER is
    apart from ABSTAIN, so a -1 read back is OTHER, never a certificate's abstention."""
    body = encode(Answer(np.array([OTHER, 2])))
    n = struct.unpack_from("<I", body)[0]
    assert np.frombuffer(body, np.int32, 2, 4 + n).tolist() == [-1, 2]
    # an entry as an older bbsmooth wrote it: header, then int32 labels with -1
    header = json.dumps({"n": 3, "k": None}).encode()
    old = struct.pack("<I", len(header)) + header + np.array([-1, 5, -1], np.int32).tobytes()
    back = decode(old)
    assert back is not None and back.labels.tolist() == [OTHER, 5, OTHER]
    assert OTHER != ABSTAIN and ABSTAIN not in back.labels.tolist()
    assert decode(encode(back)) is not None and encode(back) == old  # written back as it was


def test_record_round_trip_and_damage_detection():
    answer = Answer(np.array([3, OTHER, 7]), np.arange(6, dtype=np.float32).reshape(3, 2))
    seal = Seal(None)
    blob = seal.seal("k", encode(answer))
    back = decode(seal.open("k", blob))
    assert back is not None and back.labels.tolist() == [3, OTHER, 7]
    assert np.array_equal(back.scores, answer.scores)
    assert decode(encode(Answer(np.array([1, 2])))).scores is None
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    assert seal.open("k", bytes(flipped)) is None
    assert seal.open("other key", blob) is None  # an entry copied under another key
    assert decode(encode(answer)[:-3]) is None
    assert decode(b"not a record") is None


def certify_http(url, image, cache, n=2000):
    bb = open_blackbox(url, EndpointOptions(batch=100, concurrency=4))
    s = Smoothed(bb, sigma=0.25, cache=cache, device="cpu")
    try:
        return s.certify_sync(image, n0=100, n=n, alpha=0.001)
    finally:
        s.close()


def test_second_identical_certification_sends_nothing(server, digit_images, tmp_path):
    cache = BlockCache(tmp_path / "cache")
    image = load_image(digit_images[1])
    first = certify_http(server.url, image, cache)
    seen = server.images
    second = certify_http(server.url, image, cache)
    assert first.queries_sent == 2100 and first.queries_cached == 0
    assert second.queries_sent == 0 and second.queries_cached == 2100
    assert server.images == seen
    assert (second.label, second.radius, second.counts) == (first.label, first.radius, first.counts)
    # A larger n reuses the answered prefix and only asks for the rest.
    third = certify_http(server.url, image, cache, n=3000)
    assert third.queries_sent == 1000 and server.images == seen + 1000


def test_damaged_entry_is_asked_again_never_trusted(server, digit_images, tmp_path):
    cache = BlockCache(tmp_path / "cache")
    image = load_image(digit_images[2])
    first = certify_http(server.url, image, cache)
    key, (_, value) = next(iter(cache_rows(tmp_path / "cache").items()))
    blob = bytearray(value)
    blob[60] ^= 0xFF
    with cache._file.writing() as db:
        db.execute(f"UPDATE {TABLE} SET value = ? WHERE key = ?", (bytes(blob), key))
    again = certify_http(server.url, image, cache)
    assert 0 < again.queries_sent < 2100
    assert again.counts == first.counts and again.radius == first.radius


@pytest.mark.process
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_certification_resumes_with_the_same_certificate(
    sig, digits_model, digit_images, tmp_path
):
    model = TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))
    args = [digit_images[3], "--sigma", "0.25", "--n", "6000", "--batch", "50"]
    args += ["--concurrency", "2", "--json", "--cache", tmp_path / "cache"]
    # 100 images per 0.1 s: the kill lands seconds before the end, even on a loaded machine
    with InferenceServer(model, name="digits", delay=0.1) as slow:
        cmd = [sys.executable, "-m", "blackbox_smooth", "certify", "--endpoint", slow.url]
        proc = subprocess.Popen(
            [*cmd, *map(str, args)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # a shell that started the suite in the background leaves SIGINT ignored in its
            # children: give this one Ctrl-C's usual meaning, as in a terminal
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 60
        while slow.images < 3000 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
        time.sleep(0.3)  # requests already on the server finish (their answers are lost)
        assert slow.images < 6100
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # Ctrl-C: one line, exit 130
            assert proc.returncode == 130
            assert err.decode().strip().splitlines() == [
                "bbsmooth: error: interrupted; answered blocks are cached: "
                "run the same command again to resume"
            ]
        before_resume = slow.images
        resumed = run_cli("certify", "--endpoint", slow.url, *args)
        resent = slow.images - before_resume
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads(resumed.stdout)
    assert got["queries_cached"] >= 2000 and got["queries_sent"] == resent
    # every sample once, and 8 cached ones asked again before the cache was trusted (the canary)
    assert got["queries_sent"] + got["queries_cached"] == 6100 + 8
    assert "(8 queries): they agree" in resumed.stderr
    with InferenceServer(model, name="digits") as fresh:
        clean = run_cli("certify", "--endpoint", fresh.url, *args[:-2], "--no-cache")
    expected = json.loads(clean.stdout)
    for key in ("label", "radius", "p_lower", "counts"):
        assert got[key] == expected[key]


@pytest.mark.parametrize("spec_kind", ["python", "torch"])
def test_default_caching_follows_what_the_fingerprint_can_prove(spec_kind, digits_model, tmp_path):
    # A python: function may read weights its source digest cannot see: not cached unless asked.
    src = tmp_path / "f.py"
    src.write_text("import numpy as np\ndef f(x):\n    return np.zeros(len(x), dtype=int)\n")
    spec = f"python:{src}:f" if spec_kind == "python" else f"torch:{digits_model}"
    assert open_blackbox(spec).cache_by_default == (spec_kind == "torch")
