"""Noise streams and the vote aggregator: reproducible counts, batching, concurrency, budget."""

import asyncio

import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.blackbox import OTHER
from blackbox_smooth.errors import BudgetExhausted
from blackbox_smooth.noise import NoiseStream, block_size
from blackbox_smooth.smooth import Smoothed

FIVE_CLASS = """
import numpy as np
M = np.random.default_rng(7).normal(size=(5, 48))
def f(x):
    return (x.reshape(len(x), -1) @ M.T).argmax(axis=1)
"""


@pytest.fixture()
def five_class(tmp_path):
    path = tmp_path / "five.py"
    path.write_text(FIVE_CLASS)
    return f"python:{path}:f"


def counts_for(spec, batch, concurrency, seed=0):
    from blackbox_smooth.adapters import EndpointOptions

    bb = open_blackbox(spec, EndpointOptions(batch=batch))
    s = Smoothed(bb, sigma=0.5, seed=seed, concurrency=concurrency, device="cpu")
    x = np.linspace(0, 1, 48, dtype=np.float32).reshape(3, 4, 4)
    cert = s.certify_sync(x, n0=37, n=2500, alpha=0.001)
    s.close()
    return cert.counts_selection, cert.counts


def test_same_seed_same_counts_whatever_batch_or_concurrency(five_class):
    reference = counts_for(five_class, 256, 16)
    assert sum(reference[1].values()) == 2500 and sum(reference[0].values()) == 37
    assert len(reference[1]) > 1  # a split vote, so any reordering would show
    for batch in (1, 7, 256):
        for concurrency in (1, 16):
            assert counts_for(five_class, batch, concurrency) == reference


def test_another_seed_gives_other_noise(five_class):
    assert counts_for(five_class, 256, 16, seed=1) != counts_for(five_class, 256, 16, seed=0)


def test_noise_blocks_are_reproducible_gaussian_and_prefix_consistent():
    s = NoiseStream((1, 8, 8), 0.5, seed=3, digest="abc", device=torch.device("cpu"))
    a, b = s.block("estimation", 2), s.block("estimation", 2)
    assert torch.equal(a, b)
    assert torch.equal(s.block("estimation", 2, 10), a[:10])
    assert not torch.equal(a, s.block("selection", 2))  # regions are disjoint streams
    assert not torch.equal(a, s.block("estimation", 3))
    assert a.dtype == torch.float64 and a.std().item() == pytest.approx(0.5, rel=0.03)
    assert s.blocks(2500) == [(0, 1024), (1, 1024), (2, 452)]
    assert block_size((3, 224, 224)) == 111 and block_size((1, 28, 28)) == 1024


def test_selection_and_estimation_use_disjoint_samples(tmp_path):
    # A callable that records every noisy input it sees: no sample may be seen twice.
    src = tmp_path / "rec.py"
    src.write_text(
        "import numpy as np\nSEEN = []\n"
        "def f(x):\n    SEEN.extend(map(bytes, x.reshape(len(x), -1)))\n"
        "    return np.zeros(len(x), dtype=int)\n"
    )
    bb = open_blackbox(f"python:{src}:f")
    s = Smoothed(bb, sigma=0.3, device="cpu")
    s.certify_sync(np.zeros((1, 3, 3), np.float32), n0=200, n=1500)
    seen = bb.fn.__globals__["SEEN"]
    assert len(seen) == 1700 and len(set(seen)) == 1700
    s.close()


def test_labels_outside_the_map_vote_other_never_for_the_top_class(tmp_path):
    src = tmp_path / "neg.py"
    # Class 4 on 30% of samples, an unknown label (-5 → OTHER) otherwise.
    src.write_text(
        "import numpy as np\n"
        "def f(x):\n    return np.where(x.reshape(len(x), -1)[:, 0] > 0.26, 4, -5)\n"
    )
    s = Smoothed(open_blackbox(f"python:{src}:f"), sigma=0.5, device="cpu")
    cert = s.certify_sync(np.zeros((1, 2, 2), np.float32), n0=100, n=1000)
    assert set(cert.counts) == {4, OTHER}
    assert cert.abstain and cert.label == -1
    s.close()


def test_max_queries_is_never_exceeded(five_class):
    bb = open_blackbox(five_class)
    calls = []
    original = bb.classify_sync

    def counting(images):
        calls.append(len(images))
        return original(images)

    bb.classify_sync = counting
    s = Smoothed(bb, sigma=0.5, max_queries=3000, device="cpu")
    x = np.zeros((3, 4, 4), np.float32)
    s.certify_sync(x, n0=100, n=2000)  # 2,100 of 3,000
    with pytest.raises(BudgetExhausted, match="max-queries"):
        s.certify_sync(x + 0.1, n0=100, n=2000)  # another 2,100 would cross 3,000
    assert sum(calls) == 2100
    # The same image again replays nothing from disk (no cache here) but fits: 0 new blocks
    # are impossible without a cache, so it is refused too.
    with pytest.raises(BudgetExhausted):
        s.certify_sync(x, n0=100, n=2000)
    assert sum(calls) <= 3000
    s.close()


def test_async_api_certifies_images_concurrently(five_class):
    bb = open_blackbox(five_class)
    s = Smoothed(bb, sigma=0.5, device="cpu")
    xs = [np.full((3, 4, 4), v, np.float32) for v in (0.1, 0.5, 0.9)]

    async def run():
        return await asyncio.gather(*(s.certify(x, n0=50, n=1000) for x in xs))

    together = asyncio.run(run())
    alone = [
        Smoothed(open_blackbox(five_class), sigma=0.5, device="cpu").certify_sync(x, n0=50, n=1000)
        for x in xs
    ]
    assert [c.counts for c in together] == [c.counts for c in alone]


class _HeavyWire:
    """A remote-like black box whose requests hold `per_value` bytes per pixel value while in
    flight; it records how many requests were ever in flight at once."""

    fingerprint = "heavy"
    description: dict = {}
    cache_by_default = False
    transport = labels = annotate = None

    def __init__(self, max_batch: int, per_value: float) -> None:
        self.max_batch, self.wire_bytes_per_value = max_batch, per_value
        self.now = self.peak = 0

    async def classify(self, images):
        from blackbox_smooth.blackbox import Answer

        self.now += 1
        self.peak = max(self.peak, self.now)
        await asyncio.sleep(0.01)
        self.now -= 1
        return Answer(np.zeros(len(images), dtype=np.int64))

    async def aclose(self):
        return None


@pytest.mark.parametrize("per_value", [16.0, 0.001])
def test_requests_in_flight_are_capped_by_the_bytes_they_hold(per_value, monkeypatch):
    """Requests of 64 images of 1×224×224 at 16 bytes a value (JSON fp32) hold 51 MB each:
    with REQUEST_BYTES at 110 MB only 2 are in flight, not --concurrency 16; tiny ones are
    not held back by it. The counts are the same either way."""
    from blackbox_smooth import votes

    monkeypatch.setattr(votes, "REQUEST_BYTES", 110_000_000)
    box = _HeavyWire(64, per_value)
    s = Smoothed(box, sigma=0.25, seed=0, concurrency=16, device="cpu")
    cert = s.predict_sync(np.zeros((1, 224, 224), dtype=np.float32), n=1024, alpha=0.001)
    assert box.peak == 2 if per_value > 1 else box.peak > 2
    assert cert.counts == {0: 1024}
    s.close()


def test_a_local_model_takes_passes_sized_by_max_memory_and_digits_a_whole_batch(digits_model):
    """A local model's forward passes are sized by what an input value costs while it runs and
    by --max-memory's share: 27 images at 224×224×3 and 13 at 320×320 under the default 1G
    (onnxruntime's arena had kept gigabytes for passes of 1,024), four times as many at 4G."""
    from blackbox_smooth import memory
    from blackbox_smooth.votes import Budget, Votes

    box = open_blackbox(f"torch:{digits_model}")
    votes = Votes(box, None, 16, Budget(None))
    assert box.max_batch == 1024
    memory.use("1G")
    assert votes.request_size(3 * 224 * 224) == 27
    assert votes.request_size(3 * 320 * 320) == 13
    assert votes.request_size(28 * 28) == 1024
    memory.use("4G")
    assert votes.request_size(3 * 224 * 224) == 111
    memory.use("1G")
    asyncio.run(box.aclose())


def test_a_failed_certification_gives_back_what_it_never_sent():
    """A long-lived service must not lose its --max-queries to an upstream outage: what a
    failed certification reserved and never sent goes back to the budget."""
    import numpy as np

    from blackbox_smooth.blackbox import Answer
    from blackbox_smooth.errors import EndpointError
    from blackbox_smooth.smooth import Smoothed

    class Failing:
        fingerprint, description, max_batch, cache_by_default = "f", {"p": "f"}, 100, False
        wire_bytes_per_value, transport, labels, annotate = 0, None, None, None

        def __init__(self) -> None:
            self.calls = self.asked = 0

        async def classify(self, images):
            self.calls += 1
            self.asked += len(images)
            await asyncio.sleep(0.01)  # a request takes time: the failure stops the rest
            if self.calls >= 3:
                raise EndpointError("upstream down")
            return Answer(np.zeros(len(images), np.int64))

        async def aclose(self) -> None:
            pass

    box = Failing()
    s = Smoothed(box, 0.5, device="cpu", max_queries=700, concurrency=1, ledger=None)
    x = np.full((1, 2, 2), 0.5, np.float32)
    with pytest.raises(EndpointError):
        s.certify_sync(x, n0=50, n=500)
    assert s.votes.budget.reserved == box.asked < 550  # only what was sent stays spent
    with pytest.raises(EndpointError):
        s.predict_sync(x, n=300)
    assert s.votes.budget.reserved == box.asked
    s.close()
