"""The Open Inference Protocol adapter against bbsmooth's own server: in process (its ASGI app
behind an injected httpx transport) where the translation is the point, on loopback where the
socket is (streamed bodies, a refusal before the body is read, dropped connections); and what
the transport keeps with an injected httpx transport (deadline, retries, concurrency)."""

import asyncio
import time

import httpx
import numpy as np
import pytest
import torch

from blackbox_smooth.adapters import EndpointOptions, HttpTransport, RetryPolicy, open_blackbox
from blackbox_smooth.adapters.local import TorchModel
from blackbox_smooth.cache import BlockCache
from blackbox_smooth.data import load_image
from blackbox_smooth.errors import EndpointError, UsageError
from blackbox_smooth.serve import InferenceServer
from blackbox_smooth.smooth import Smoothed

from .faults import FaultyServer

FAST_RETRY = {"retries": 6, "backoff": 0.01, "max_backoff": 0.05}


def smoothed_for(url, *, batch=50, concurrency=4, cache=None, kserve=None, retry=FAST_RETRY,
                 wire=None):  # fmt: skip
    options = EndpointOptions(batch=batch, concurrency=concurrency, **retry, **(kserve or {}))
    box = open_blackbox(url, options, httpx_transport=wire)
    return Smoothed(box, sigma=0.25, cache=cache, concurrency=concurrency, device="cpu")


def certify(url, image, **kw):
    s = smoothed_for(url, **kw)
    try:
        return s.certify_sync(image, n0=64, n=1000, alpha=0.001)
    finally:
        s.close()


@pytest.fixture()
def image(digit_images):
    return load_image(digit_images[0])


class InProcess(httpx.AsyncBaseTransport):
    """The digits server's ASGI app in process: `url`, `wire` (the transport to give
    `open_blackbox`), and the server's counters."""

    url = "http://127.0.0.1/v2/models/digits/infer"

    def __init__(self, served: InferenceServer) -> None:
        self.served = served  # never started: no socket
        self.wire = self
        self._loop: asyncio.AbstractEventLoop | None = None
        self._app: httpx.ASGITransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        if self._app is None or loop is not self._loop:  # its semaphores are one loop's
            self._app, self._loop = httpx.ASGITransport(app=self.served.asgi()), loop
        return await self._app.handle_async_request(request)

    @property
    def requests(self) -> int:
        return self.served.requests

    @property
    def images(self) -> int:
        return self.served.images


@pytest.fixture()
def app(digits_torch) -> InProcess:
    return InProcess(InferenceServer(digits_torch, name="digits"))


def test_http_counts_equal_local_counts(app, digits_model, image):
    server = app
    over_http = certify(server.url, image, wire=app.wire)
    local = Smoothed(open_blackbox(f"torch:{digits_model}"), sigma=0.25, device="cpu").certify_sync(
        image, n0=64, n=1000, alpha=0.001
    )
    # fp32 over the wire clips to [0,1] (the local model sees unclipped noise), so compare
    # the prediction and accuracy, then exactness against a local model that clips the same way.
    assert over_http.label == local.label
    assert server.images == 1064 and server.requests == 22  # ceil(64/50) + ceil(1000/50)
    clipped = _clipped(digits_model)
    s = Smoothed(clipped, sigma=0.25, device="cpu")
    assert s.certify_sync(image, n0=64, n=1000, alpha=0.001).counts == over_http.counts


def test_large_bodies_are_streamed_whole_with_their_length(server, digits_model, image):
    """A request over a mebibyte goes out in pieces (so asyncio never copies it whole), yet
    as one body with a content-length: the server's answers are those of small requests."""
    big = certify(server.url, image, batch=1000)  # 1,000 digits as JSON text: ~8 MB
    assert server.requests == 2 and server.images == 1064
    s = Smoothed(_clipped(digits_model), sigma=0.25, device="cpu")
    assert s.certify_sync(image, n0=64, n=1000, alpha=0.001).counts == big.counts


def test_a_body_over_the_servers_limit_is_refused_not_dropped_and_sent_again_split(
    digits_torch, digits_model, image, capfd
):
    """The server answers 413 without reading the body, then drains what is still coming
    before it closes: closing at once reset the connection, and the client saw "ReadError".
    The client reads the 413, splits the request and sends it again smaller (the counts are
    those of requests that fit; refused images are never answered)."""
    small = InferenceServer(digits_torch, name="digits", max_request_bytes=1 << 20)
    with small:
        split = certify(small.url, image, batch=1000)
    assert small.images == 1064 and small.requests > 2
    assert "HTTP 413" in capfd.readouterr().err
    s = Smoothed(_clipped(digits_model), sigma=0.25, device="cpu")
    assert s.certify_sync(image, n0=64, n=1000, alpha=0.001).counts == split.counts


def test_requests_larger_than_the_memory_cap_are_split_whatever_batch_asks(
    app, digits_model, image, monkeypatch
):
    """--batch is an upper bound: where one request of that many images would alone pass the
    cap on what requests hold, it is cut to fit, and the votes are the same."""
    from blackbox_smooth import votes

    per_image = 28 * 28 * 16  # float32 as JSON text: the adapter's estimate per value
    monkeypatch.setattr(votes, "REQUEST_BYTES", 8 * per_image)
    split = certify(app.url, image, batch=50, wire=app.wire)
    assert app.images == 1064 and app.requests == 8 + 125  # 64 and 1,000 in eights
    s = Smoothed(_clipped(digits_model), sigma=0.25, device="cpu")
    assert s.certify_sync(image, n0=64, n=1000, alpha=0.001).counts == split.counts


def _clipped(path):
    model = TorchModel.from_torchscript(str(path), torch.device("cpu"))
    inner = model.classify_sync
    model.classify_sync = lambda images: inner(images.clamp(0, 1))
    return model


def test_counts_identical_under_faults(digits_model, image):
    faults = {1: "503", 3: "429-retry-after", 5: "drop", 7: "malformed", 9: "truncated",
              11: "wrong-count", 13: "429", 15: "500", 16: "503", 17: "drop"}  # fmt: skip
    model = TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))
    with InferenceServer(model, name="digits") as clean:
        expected = certify(clean.url, image)
    with FaultyServer(model, name="digits", faults=faults.get) as faulty:
        start = time.monotonic()
        s = smoothed_for(faulty.url)
        got = s.certify_sync(image, n0=64, n=1000, alpha=0.001)
        retries = s.blackbox.transport.retries
        s.close()
        elapsed = time.monotonic() - start
    assert faulty.faults_injected == len(faults)
    assert retries == len(faults)
    assert got.counts == expected.counts and got.counts_selection == expected.counts_selection
    assert got.radius == expected.radius and got.queries_sent == 1064
    assert elapsed >= 1.0  # Retry-After: 1 was honoured


def test_persistent_faults_stop_with_endpoint_error_and_keep_answered_blocks(
    digits_model, image, tmp_path
):
    model = TorchModel.from_torchscript(str(digits_model), torch.device("cpu"))
    cache = BlockCache(tmp_path / "cache")
    # Every request after the 12th fails: the selection block is answered and cached first.
    with FaultyServer(model, name="digits", faults=lambda i: "503" if i >= 12 else None) as bad:
        s = smoothed_for(bad.url, concurrency=1, cache=cache)
        with pytest.raises(EndpointError, match="HTTP 503.*gave up after 6 attempts"):
            s.certify_sync(image, n0=64, n=2500, alpha=0.001)
        s.close()
        port = bad.port
    # The same endpoint (same URL, same fingerprint) comes back healthy.
    with InferenceServer(model, name="digits", port=port) as good:
        s = smoothed_for(good.url, cache=cache)
        resumed = s.certify_sync(image, n0=64, n=2500, alpha=0.001)
        s.close()
    assert resumed.queries_cached >= 64 and resumed.queries_sent < 2564
    assert resumed.queries_sent + resumed.queries_cached == 2564
    with InferenceServer(model, name="digits") as fresh:
        s = smoothed_for(fresh.url)
        expected = s.certify_sync(image, n0=64, n=2500, alpha=0.001)
        s.close()
    assert resumed.counts == expected.counts


@pytest.mark.parametrize(
    "layout,dtype,scale",
    [("nchw", "uint8", None), ("nhwc", "fp32", None), ("flat", "fp32", 2.0)],
)
def test_wire_options_shape_the_request(layout, dtype, scale):
    bb = open_blackbox(
        "http://127.0.0.1:1/v2/models/m/infer",
        EndpointOptions(
            input_layout=layout, input_dtype=dtype, input_scale=scale, input_name="input-0"
        ),
    )  # all given: no metadata is asked for
    x = torch.tensor([[[[-0.2, 0.5], [1.3, 0.25]]]])  # 1×1×2×2, noisy and out of range
    body = bb.request(x)["inputs"][0]
    expected_shape = {"nchw": [1, 1, 2, 2], "nhwc": [1, 2, 2, 1], "flat": [1, 4]}[layout]
    assert body["shape"] == expected_shape
    assert body["datatype"] == {"fp32": "FP32", "uint8": "UINT8"}[dtype]
    s = scale or (255 if dtype == "uint8" else 1)
    expected = np.array([0.0, 0.5, 1.0, 0.25]) * s  # clipped to [0,1] first
    if dtype == "uint8":
        expected = np.round(expected)
    assert body["data"] == pytest.approx(expected.tolist())
    # Everything that changes the answers is part of the fingerprint.
    defaults = EndpointOptions(input_layout="nchw", input_dtype="fp32", input_name="input-0")
    other = open_blackbox("http://127.0.0.1:1/v2/models/m/infer", defaults)
    assert (bb.fingerprint == other.fingerprint) == (layout == "nchw" and dtype == "fp32")


def test_uint8_wire_and_named_output_work_end_to_end(app, image):
    labels_only = certify(app.url, image, wire=app.wire,
                          kserve={"input_dtype": "uint8", "output": "label"})  # fmt: skip
    scores = certify(app.url, image, kserve={"input_dtype": "uint8"}, wire=app.wire)
    assert labels_only.counts == scores.counts and not labels_only.abstain


def test_fingerprint_and_errors_hold_no_credentials():
    complete = EndpointOptions(input_layout="nchw", input_dtype="fp32", input_name="input-0")
    bb = open_blackbox("http://127.0.0.1:1/v2/models/m/infer?key=SECRET", complete)
    assert "secret" not in str(bb.description).lower()
    for url in (
        "http://user:secret@127.0.0.1:1/v2/models/m/infer",  # credentials belong in $ENV
        "http://127.0.0.1:1/predict?key=SECRET",  # a protocol we cannot tell
    ):
        with pytest.raises(UsageError) as e:
            open_blackbox(url)
        assert "secret" not in str(e.value).lower()


def test_client_error_is_not_retried(app, image):
    s = smoothed_for(app.url.replace("/digits/", "/nope/"), wire=app.wire)
    with pytest.raises(EndpointError, match="HTTP 404"):
        s.certify_sync(image, n0=10, n=10)
    assert s.blackbox.transport.retries == 0
    s.close()


def test_rate_limit_spaces_requests(server, image):
    options = EndpointOptions(batch=10, concurrency=8, rps=40.0)
    s = Smoothed(open_blackbox(server.url, options), sigma=0.25, concurrency=8, device="cpu")
    start = time.monotonic()
    s.predict_sync(image, n=200)  # 20 requests at ≤ 40/s: at least 19 intervals of 25 ms
    elapsed = time.monotonic() - start
    s.close()
    assert server.requests == 20 and elapsed >= 19 / 40


def test_one_black_box_serves_several_event_loops(server):
    from blackbox_smooth.votes import Votes

    bb = open_blackbox(server.url)  # on loopback: connections belong to their event loop
    images = torch.rand(3, 1, 28, 28)
    answers = [asyncio.run(Votes(bb).ask(images)).labels.tolist() for _ in range(3)]
    assert answers[0] == answers[1] == answers[2] and server.requests == 3


# -- an injected transport keeps every bound of the sockets' ------------------------------------
URL = "http://127.0.0.1/v2/models/m/infer"


def _post(transport: HttpTransport, count: int = 1) -> list:
    async def all_of() -> list:
        try:
            return await asyncio.gather(
                *(transport.post_json(URL, {"i": i}, lambda a: a) for i in range(count))
            )
        finally:
            await transport.aclose()

    return asyncio.run(all_of())


def test_an_injected_transport_keeps_the_deadline_and_retries_within_it():
    calls = []

    async def stalls(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        await asyncio.sleep(5)
        return httpx.Response(200, json={})

    fast = RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.02)
    wire = HttpTransport(timeout=0.2, retry=fast, httpx_transport=httpx.MockTransport(stalls))
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"longer than --timeout 0.2s.*gave up after 2"):
        _post(wire)
    assert len(calls) == 2 and time.monotonic() - start < 3 and wire.retries == 1


def test_an_injected_transport_retries_a_busy_answer_and_keeps_the_concurrency():
    busy, peak, seen = [0], [0], []

    async def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) <= 2:
            return httpx.Response(503, json={"error": "busy"})
        busy[0] += 1
        peak[0] = max(peak[0], busy[0])
        await asyncio.sleep(0.01)
        busy[0] -= 1
        return httpx.Response(200, content=request.content)

    fast = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.02)
    wire = HttpTransport(concurrency=3, retry=fast, httpx_transport=httpx.MockTransport(answer))
    assert _post(wire, 20) == [{"i": i} for i in range(20)]
    assert wire.retries == 2 and peak[0] == 3 and len(seen) == 22


def test_an_injected_transport_is_the_callers_and_stays_open():
    class Counted(httpx.MockTransport):
        closed = 0

        async def aclose(self) -> None:
            Counted.closed += 1

    inner = Counted(lambda request: httpx.Response(200, json=[1]))
    wire = HttpTransport(httpx_transport=inner)
    assert _post(wire, 8) == [[1]] * 8 and wire.get_json_sync(URL) == [1]
    assert Counted.closed == 0
