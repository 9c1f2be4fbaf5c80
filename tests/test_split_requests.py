"""A request the server refuses for its size (HTTP 413) is split and sent again smaller, the
smaller size kept for the rest of the run and told once; the certificate is the one a small
enough --batch gives from the start, and a refused request is never counted as a query. Against
a real `bbsmooth serve` on loopback, through the CLI."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from blackbox_smooth.blackbox import Answer
from blackbox_smooth.data import save_image
from blackbox_smooth.errors import EndpointError, RequestTooLarge
from blackbox_smooth.serve import ServerProcess
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.votes import Budget, Votes

from .conftest import messages, run_cli

# At 224×224 one noisy image is ~1.6 MB of JSON: two fit in 4 MiB, four do not, nor one at 448.
LIMIT = 4 * 2**20
N0, N = 8, 32


class ChannelMeans(torch.nn.Module):
    """4 logits: the three channel means and their average (the brightest channel wins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return 10 * torch.cat([m, m.mean(dim=1, keepdim=True)], dim=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("split")
    model = root / "means.pt"
    torch.jit.save(torch.jit.script(ChannelMeans()), str(model))
    out = {"model": model}
    for side in (224, 320, 448):
        x = np.empty((3, side, side), np.float32)
        x[0], x[1], x[2] = 0.6, 0.3, 0.4
        out[f"image{side}"] = root / f"red{side}.png"
        save_image(x, out[f"image{side}"])
    return out


@pytest.fixture(scope="module")
def small_server(files):
    """`bbsmooth serve` taking request bodies of at most LIMIT bytes."""
    extra = ("--max-request-bytes", str(LIMIT))
    with ServerProcess(f"torch:{files['model']}", "means", extra=extra) as server:
        yield server


def _certify(url: str, image: Path, *extra: str):
    if "--cache" not in extra:
        extra = (*extra, "--no-cache")
    return run_cli("certify", image, "-e", url, "--sigma", "0.25", "--n0", str(N0), "--n", str(N),
                   "--json", *extra)  # fmt: skip


def _refusals(stderr: str) -> list[str]:
    return [line for line in messages(stderr) if "413" in line]


@pytest.mark.process
def test_refused_requests_are_split_and_the_certificate_is_unchanged(small_server, files, tmp_path):
    cache = ("--cache", str(tmp_path / "cache"))
    split = _certify(small_server.url, files["image224"], "--batch", "8", *cache)
    assert split.returncode == 0, split.stderr
    told = _refusals(split.stderr)
    assert len(told) == 1, split.stderr
    assert "warning" in told[0] and "at most 2 per request" in told[0] and "--batch 2" in told[0]

    fits = _certify(small_server.url, files["image224"], "--batch", "2")
    assert fits.returncode == 0, fits.stderr
    assert not _refusals(fits.stderr), fits.stderr

    a, b = json.loads(split.stdout), json.loads(fits.stdout)
    assert a["label"] == b["label"] == 0
    assert (a["radius"], a["counts"], a["p_lower"]) == (b["radius"], b["counts"], b["p_lower"])
    assert a["queries_sent"] == b["queries_sent"] == N0 + N  # a refused request is no query

    again = _certify(small_server.url, files["image224"], "--batch", "8", *cache)  # cached
    assert again.returncode == 0, again.stderr
    c = json.loads(again.stdout)
    assert (c["label"], c["radius"], c["counts"]) == (a["label"], a["radius"], a["counts"])
    assert c["queries_cached"] == N0 + N, again.stderr


@pytest.mark.process
def test_one_image_too_large_is_one_line_naming_the_limit(small_server, files):
    r = _certify(small_server.url, files["image448"], "--batch", "4")
    assert r.returncode == 3, r.stderr
    lines = messages(r.stderr)
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert "single image" in line and "HTTP 413" in line and f"{LIMIT:,}" in line
    assert "--max-request-bytes" in line and "--size" in line
    assert "warning" not in r.stderr


@pytest.mark.process
def test_defaults_work_against_serve_defaults_at_320(files):
    with ServerProcess(f"torch:{files['model']}", "means") as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v2", timeout=10) as reply:
            meta = json.load(reply)
        assert meta["name"] == "bbsmooth" and isinstance(meta["extensions"], list)
        r = run_cli("certify", files["image320"], "-e", server.url, "--sigma", "0.25",
                    "--n0", "16", "--n", "100", "--json", "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert len(_refusals(r.stderr)) == 1, r.stderr  # 54 images, then 23, are refused
    rec = json.loads(r.stdout)
    assert rec["label"] == 0 and rec["queries_sent"] == 116


class Picky:
    """A black box whose server refuses requests of more than `fits` images (413), and that
    fails for good once it has answered `fail_after` images; labels follow the images. `asked`:
    images in requests it did not refuse (a failed one may still have been charged)."""

    fingerprint, description, max_batch, cache_by_default = "picky", {"p": "picky"}, 16, False
    wire_bytes_per_value, transport, labels, annotate = 0, None, None, None

    def __init__(self, fits: int = 3, fail_after: int | None = None) -> None:
        self.fits, self.fail_after = fits, fail_after
        self.refused = self.answered = self.asked = 0

    async def classify(self, images: torch.Tensor) -> Answer:
        if len(images) > self.fits:
            self.refused += 1
            raise RequestTooLarge("POST x answered HTTP 413", "POST x", "too large", 10**6)
        self.asked += len(images)
        await asyncio.sleep(0.001)  # a request takes time: a failure stops the rest
        if self.fail_after is not None and self.answered >= self.fail_after:
            raise EndpointError("upstream down")
        self.answered += len(images)
        return Answer((images.reshape(len(images), -1)[:, 0] > 0.5).long().numpy())

    async def aclose(self) -> None:
        pass


def test_split_answers_keep_their_order_and_the_size_is_kept(capsys):
    box = Picky(fits=3)
    votes = Votes(box, None, 4, Budget(None))
    images = torch.rand(40, 1, 2, 2)
    answer = asyncio.run(votes.ask(images))
    assert answer.labels.tolist() == (images[:, 0, 0, 0] > 0.5).long().tolist()
    assert votes.sent == box.answered == 40 and votes.request_size(4) == 2
    refused = box.refused
    asyncio.run(votes.ask(torch.rand(10, 1, 2, 2)))  # the smaller size is kept: no refusal
    assert box.refused == refused
    told = [line for line in capsys.readouterr().err.splitlines() if "413" in line]
    assert told == [
        "bbsmooth: warning: the server refused 4-image requests as too large (HTTP 413): "
        "sending at most 2 per request from now on (--batch 2 skips the refusals)"
    ]


def test_a_refused_request_is_not_counted_as_sent():
    """What a failed certification reserved and never sent goes back to --max-queries, and a
    request refused for its size (unread) was never sent."""
    box = Picky(fits=3, fail_after=40)
    s = Smoothed(box, 0.5, device="cpu", max_queries=700, concurrency=1, ledger=None)
    with pytest.raises(EndpointError, match="upstream down"):
        s.certify_sync(np.full((1, 2, 2), 0.5, np.float32), n0=50, n=500)
    assert box.refused > 0 and box.answered == 40
    assert s.votes.budget.reserved == box.asked < 50
    s.close()
