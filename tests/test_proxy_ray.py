"""`bbsmooth proxy --ray`: the same app as a Ray Serve deployment of 2 replicas on a local Ray,
in front of a real Open Inference Protocol server: the answers of `bbsmooth certify`, and one
upstream budget for both replicas (the coordinator's), never crossed at the model."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from blackbox_smooth import jobs
from blackbox_smooth.options import CertifyOptions, ImageOptions, ProxyOptions, SmoothingOptions
from blackbox_smooth.serve import free_port

from .conftest import run_cli

PLAN = CertifyOptions(n0=50, n=500)
PER_IMAGE = 550


@pytest.mark.process  # a local Ray: its head and workers are processes of their own
def test_two_replicas_answer_as_certify_and_hold_one_budget(server, digit_images, tmp_path):
    import ray
    from ray import serve

    budget = 2 + 3 * PER_IMAGE  # each replica's readiness probe, and three certifications
    options = SmoothingOptions(server.url, 0.25, cache=tmp_path / "cache", max_queries=budget)
    settings = ProxyOptions(port=free_port(), ray="auto", replicas=2)
    assert not ray.is_initialized()
    deployed = jobs.proxy(options, PLAN, ImageOptions(size="28x28", grayscale=True), settings)
    try:
        status = serve.status().applications["bbsmooth-proxy"].deployments["proxy"]
        assert status.replica_states == {"RUNNING": 2}
        first = httpx.post(f"{deployed.url}/v1/certify", content=digit_images[0].read_bytes(),
                           headers={"content-type": "image/png"}, timeout=120)  # fmt: skip
        assert first.status_code == 200, first.text
        before = server.images
        cli = run_cli("certify", digit_images[0], "-e", server.url, "--sigma", "0.25", "--n0",
                      "50", "--n", "500", "--json", "--cache", tmp_path / "cli")  # fmt: skip
        by_cli = server.images - before  # not the proxy's
        expected = json.loads(cli.stdout)
        assert (first.json()["label"], first.json()["radius"]) == (
            expected["label"], expected["radius"])  # fmt: skip

        def certify(i: int) -> int:
            image = digit_images[i % len(digit_images)].read_bytes()
            flipped = image if i < len(digit_images) else _variant(image, i)
            return httpx.post(f"{deployed.url}/v1/certify", content=flipped,
                              headers={"content-type": "image/png"}, timeout=120).status_code  # fmt: skip

        # 6 more distinct images at once, spread over both replicas: 2 × 550 left in the budget
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(certify, range(1, 7)))
        assert codes.count(200) >= 1 and codes.count(429) >= 3, codes
        assert set(codes) <= {200, 429}, codes
    finally:
        deployed.stop()
    # one budget for both replicas: the model never answered more than it allows (2 replicas
    # with a budget each could have sent up to twice as much)
    assert server.images - by_cli <= budget, (server.images, by_cli)
    assert not ray.is_initialized()  # the local cluster --ray auto started is gone with it


def _variant(png: bytes, i: int) -> bytes:
    """Another image: the digit with one pixel changed."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(png))
    picture.putpixel((i, i), (picture.getpixel((i, i)) + 128) % 256)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
