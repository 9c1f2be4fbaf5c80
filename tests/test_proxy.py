"""`bbsmooth proxy` on a real uvicorn server on 127.0.0.1 (in a thread), in front of a real
Open Inference Protocol server for the digits model: the same certificates as `bbsmooth
certify`, one certification for identical requests, quotas and the budget (429), deadlines
(504), keys (401), hostile bodies and tensors (one JSON line each, the right status), metrics."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from blackbox_smooth import jobs
from blackbox_smooth.data import load_image
from blackbox_smooth.options import (
    CertifyOptions,
    EndpointOptions,
    ImageOptions,
    ProxyOptions,
    SmoothingOptions,
)
from blackbox_smooth.proxy.app import CertifyAnswer, PredictAnswer
from blackbox_smooth.serve import InferenceServer

from .conftest import run_cli
from .faults import FAULTS, FaultyServer

PLAN = CertifyOptions(n0=50, n=500)
IMAGING = ImageOptions(size="28x28", grayscale=True)
PER_IMAGE = 550


@contextlib.contextmanager
def proxy(url, tmp_path, plan=PLAN, max_queries=None, wire=None, **settings):
    """The proxy in front of `url`, serving in a thread; yields (base URL, server)."""
    options = SmoothingOptions(
        endpoint=url,
        sigma=0.25,
        cache=tmp_path / "cache",
        max_queries=max_queries,
        wire=wire or EndpointOptions(),
    )
    server = jobs.proxy(options, plan, IMAGING, ProxyOptions(port=0, **settings))
    with server.in_thread():
        yield server.url, server


def png(path) -> bytes:
    return path.read_bytes()


def post_image(base, path, **kw):
    return httpx.post(f"{base}/v1/certify", content=png(path),
                      headers={"content-type": "image/png", **kw.pop("headers", {})},
                      timeout=120, **kw)  # fmt: skip


def one_line_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"]
    return body["error"]


def test_answers_equal_bbsmooth_certify(server, digit_images, tmp_path):
    with proxy(server.url, tmp_path) as (base, _):
        got = post_image(base, digit_images[0])
        assert got.status_code == 200, got.text
        answer = got.json()
        info = httpx.get(f"{base}/v1/info").json()
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    cli = run_cli("certify", digit_images[0], "-e", server.url, "--sigma", "0.25", "--n0", "50",
                  "--n", "500", "--size", "28x28", "--grayscale", "--json", "--no-cache")  # fmt: skip
    expected = json.loads(cli.stdout)
    for key in ("label", "radius", "p_lower", "n0", "n", "sigma", "alpha", "abstain"):
        assert answer[key] == expected[key], key
    assert answer["queries_sent"] == PER_IMAGE and answer["fresh"] and answer["looks"] == 1
    assert answer["noise"] == info["noise"] and answer["model"] == info["model"]
    assert (
        info["n"] == 500 and info["endpoint"] == server.url and info["image_shape"] == [1, 28, 28]
    )


def test_json_requests_choose_within_the_servers_caps(server, digit_images, tmp_path):
    image = base64.b64encode(png(digit_images[1])).decode()
    with proxy(server.url, tmp_path) as (base, _):
        small = httpx.post(f"{base}/v1/certify", json={"image": image, "n": 200}, timeout=60)
        assert small.status_code == 200 and small.json()["n"] == 200
        target = httpx.post(f"{base}/v1/certify", json={"image": image, "target_radius": 0.1},
                            timeout=60).json()  # fmt: skip
        assert target["mode"] == "target" and target["certified"] in (True, False)
        assert target["fresh"] is False and target["looks"] == 2  # the same image, looked at
        too_many = httpx.post(f"{base}/v1/certify", json={"image": image, "n": 501})
        assert "n must be 1..500" in one_line_error(too_many, 400)
        looser = httpx.post(f"{base}/v1/certify", json={"image": image, "alpha": 0.01})
        assert "alpha must be in (0, 0.001]" in one_line_error(looser, 400)
        extra = httpx.post(f"{base}/v1/certify", json={"image": image, "sigma": 9})
        one_line_error(extra, 400)
        predicted = httpx.post(f"{base}/v1/predict", json={"image": image, "n": 300}, timeout=60)
        assert predicted.status_code == 200 and predicted.json()["n"] == 300
    # the answers are what /openapi.json documents, field for field, and valid there
    assert set(small.json()) == set(CertifyAnswer.model_fields)
    CertifyAnswer.model_validate(small.json())
    assert set(predicted.json()) == set(PredictAnswer.model_fields)
    PredictAnswer.model_validate(predicted.json())


def test_a_repeat_is_answered_from_the_cache(server, digit_images, tmp_path):
    with proxy(server.url, tmp_path) as (base, _):
        first = post_image(base, digit_images[2]).json()
        seen = server.images
        again = post_image(base, digit_images[2]).json()
    assert again["queries_sent"] == 0 and again["queries_replayed"] == PER_IMAGE
    assert server.images == seen  # nothing upstream: the cache this run wrote needs no canary
    assert (again["label"], again["radius"]) == (first["label"], first["radius"])


def test_identical_concurrent_requests_share_one_certification(
    digits_torch, digit_images, tmp_path
):
    with (
        # a slow upstream: the certification lasts a second or more, long after all 50 arrive
        InferenceServer(digits_torch, name="digits", delay=0.5) as server,
        proxy(server.url, tmp_path, max_bodies=64) as (base, _),
    ):
        before = server.images
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(50)

        def ask() -> None:
            barrier.wait()
            answers.append(post_image(base, digit_images[3]))

        threads = [threading.Thread(target=ask) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{base}/metrics").text
    assert [a.status_code for a in answers] == [200] * 50
    bodies = [a.json() for a in answers]
    assert server.images - before == PER_IMAGE  # one certification upstream for all 50
    assert sum(b["queries_sent"] for b in bodies) == PER_IMAGE
    assert len({(b["label"], b["radius"]) for b in bodies}) == 1
    assert sum(not b["shared"] for b in bodies) >= 1
    assert 'bbsmooth_requests_total{route="/v1/certify",status="200"} 50.0' in metrics
    assert f'bbsmooth_upstream_queries_total{{kind="sent"}} {PER_IMAGE}.0' in metrics


def test_quotas_and_the_budget_answer_429_and_send_nothing_more(server, digit_images, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alice-key-0123456789\nbob-key-9876543210\n")
    with proxy(server.url, tmp_path, client_keys_file=keys, quota=600) as (base, _):
        alice = {"authorization": "Bearer alice-key-0123456789"}
        assert post_image(base, digit_images[0], headers=alice).status_code == 200
        seen = server.images
        refused = post_image(base, digit_images[1], headers=alice)
        assert "has 50 of its 600 left" in one_line_error(refused, 429)
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
        assert server.images == seen  # refused before a query
        bob = {"x-api-key": "bob-key-9876543210"}
        assert post_image(base, digit_images[1], headers=bob).status_code == 200
        metrics = httpx.get(f"{base}/metrics", headers=bob)
        assert metrics.status_code == 200 and "alice-key" not in metrics.text
    with proxy(server.url, tmp_path / "b", max_queries=PER_IMAGE + 1 + 100) as (base, _):
        before = server.images
        assert post_image(base, digit_images[2]).status_code == 200
        spent = post_image(base, digit_images[3])
        assert "budget" in one_line_error(spent, 429)
        assert server.images - before <= PER_IMAGE + 100


def test_keys_are_needed_and_never_shown(server, digit_images, tmp_path, monkeypatch):
    monkeypatch.setenv("PROXY_KEYS", "k-one-abcdefghijkl,k-two-mnopqrstuvwx")
    with proxy(server.url, tmp_path, client_keys_env="PROXY_KEYS") as (base, _):
        assert "Bearer KEY" in one_line_error(post_image(base, digit_images[0]), 401)
        wrong = post_image(base, digit_images[0], headers={"authorization": "Bearer k-one-x"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        right = {"authorization": "Bearer k-two-mnopqrstuvwx"}
        assert post_image(base, digit_images[0], headers=right).status_code == 200
        for route in ("/v1/info", "/metrics", "/v2", "/v2/models/smoothed"):
            one_line_error(httpx.get(f"{base}{route}"), 401)
        shown = httpx.get(f"{base}/v1/info", headers=right).text
        shown += httpx.get(f"{base}/metrics", headers=right).text
        assert "k-one" not in shown and "k-two" not in shown and "image_shape" in shown
        for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert httpx.get(f"{base}{probe}").status_code == 200  # probes stay open


def test_a_deadline_answers_504_and_the_next_attempt_replays(digits_torch, digit_images, tmp_path):
    with (
        InferenceServer(digits_torch, name="digits", delay=0.3) as slow,
        proxy(slow.url, tmp_path, deadline=0.5) as (base, _),
    ):
        late = post_image(base, digit_images[0])
        assert "--deadline 0.5" in one_line_error(late, 504)
        for _ in range(200):  # the certification goes on; its answers land in the cache
            again = post_image(base, digit_images[0])
            if again.status_code == 200:
                break
        assert again.status_code == 200 and again.json()["queries_sent"] < PER_IMAGE


def _tensor(data, shape=(1, 28, 28), datatype="FP32", **extra):
    return {"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype, "data": data}],
            **extra}  # fmt: skip


def test_the_open_inference_protocol_route_answers_label_and_radius(server, digit_images, tmp_path):
    x = load_image(digit_images[0])
    with proxy(server.url, tmp_path, name="digits-smoothed") as (base, _):
        direct = post_image(base, digit_images[0]).json()
        url = f"{base}/v2/models/digits-smoothed/infer"
        answer = httpx.post(url, json=_tensor(x.reshape(-1).tolist()), timeout=60)
        meta = httpx.get(f"{base}/v2/models/digits-smoothed").json()
        missing = httpx.post(f"{base}/v2/models/other/infer", json=_tensor([0.5] * 784))
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["label"]["data"] == [direct["label"]]
    assert outputs["radius"]["data"] == [pytest.approx(direct["radius"])]
    assert meta["outputs"][1]["name"] == "radius" and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    one_line_error(missing, 404)


MALFORMED = {
    "data null": _tensor(None),
    "NaN": _tensor([float("nan")] * 784),
    "a zero dimension": _tensor([], shape=(1, 0, 28)),
    "INT64 overflow": _tensor([2**70] * 784, datatype="INT64"),
    "UINT8 -1": _tensor([-1] * 784, datatype="UINT8"),
    "FP16 1e10": _tensor([1e10] * 784, datatype="FP16"),
    "an unknown output": _tensor([0.5] * 784, outputs=[{"name": "logits"}]),
    "too few values": _tensor([0.5] * 10),
    "not a list of inputs": {"inputs": "x"},
    "another image size": _tensor([0.5] * 900, shape=(1, 30, 30)),
}


def test_hostile_requests_get_one_json_line_and_the_service_keeps_answering(
    server, digit_images, tmp_path
):
    big = Image.new("L", (400, 400))
    bomb = io.BytesIO()
    big.save(bomb, format="PNG")  # 160,000 pixels in a few hundred bytes
    with proxy(server.url, tmp_path, max_pixels=50_000, max_body_bytes=40_000) as (base, _):
        infer = f"{base}/v2/models/smoothed/infer"
        for name, body in MALFORMED.items():
            text = json.dumps(body)  # NaN as the JSON token NaN, as a hostile client sends it
            r = httpx.post(infer, content=text, headers={"content-type": "application/json"})
            assert r.status_code == 400, (name, r.text)
            one_line_error(r, 400)
        assert one_line_error(
            httpx.post(infer, content=b"{not json", headers={"content-type": "application/json"}),
            400,
        )
        cases = [
            (b"\x89PNG not really", "image/png", 400),
            (bomb.getvalue(), "image/png", 413),
            (b"x" * 50_000, "image/png", 413),
            (b'{"image": "***"}', "application/json", 400),
            (b'{"image": 5}', "application/json", 400),
            (b"hello", "text/plain", 415),
        ]
        for content, kind, status in cases:
            r = httpx.post(f"{base}/v1/certify", content=content, headers={"content-type": kind})
            one_line_error(r, status)
        one_line_error(httpx.get(f"{base}/v1/nowhere"), 404)
        one_line_error(httpx.get(f"{base}/v1/certify"), 405)
        assert post_image(base, digit_images[0]).status_code == 200  # still answering


def test_upstream_faults_cost_retries_and_a_dead_upstream_is_a_502(
    digits_torch, digit_images, tmp_path
):
    schedule = {2 * i + 2: kind for i, kind in enumerate(FAULTS)}  # every kind once, probe spared
    wire = EndpointOptions(batch=25, concurrency=2, timeout=1.0)
    with (
        FaultyServer(digits_torch, name="digits", stall=1.5) as clean,
        proxy(clean.url, tmp_path / "a", wire=wire) as (base, _),
    ):
        expected = post_image(base, digit_images[0]).json()
    with (
        FaultyServer(digits_torch, name="digits", faults=schedule.get, stall=1.5) as faulty,
        proxy(faulty.url, tmp_path / "b", wire=wire) as (base, _),
    ):
        got = post_image(base, digit_images[0]).json()
        assert faulty.faults_injected == len(FAULTS)
    assert (got["label"], got["radius"], got["queries_sent"]) == (
        expected["label"], expected["radius"], expected["queries_sent"]
    )  # fmt: skip
    dead = EndpointOptions(batch=50, retries=2, timeout=1.0)
    with (
        FaultyServer(digits_torch, name="digits", faults=lambda i: "500" if i else None) as bad,
        proxy(bad.url, tmp_path / "c", wire=dead) as (base, _),
    ):
        failed = post_image(base, digit_images[0])
        assert "the upstream model failed" in one_line_error(failed, 502)
        assert httpx.get(f"{base}/healthz").status_code == 200  # the proxy itself stays up


def _drip(port: int) -> socket.socket:
    """A client that sends its headers, then a few bytes of a 1,000-byte body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/certify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
              b"Content-Length: 1000\r\n\r\nabc")  # fmt: skip
    return s


def test_idle_and_slow_clients_never_lock_out_a_good_one(server, digit_images, tmp_path):
    with proxy(server.url, tmp_path, client_timeout=3.0, max_bodies=2) as (base, running):
        port = running.port
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(256)]
        for s in idle[:128]:
            s.sendall(b"POST /v1/certify HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        drips = [_drip(port), _drip(port)]  # every body slot taken by a slow drip
        time.sleep(0.3)
        start = time.monotonic()
        full = post_image(base, digit_images[0])
        assert "too many request bodies" in one_line_error(full, 503)
        assert full.headers["retry-after"] == "1" and time.monotonic() - start < 10
        for s in drips:  # each drip is cut off after --client-timeout
            s.settimeout(30)
            assert s.recv(4096).startswith(b"HTTP/1.1 408")
        good = post_image(base, digit_images[0])
        assert good.status_code == 200, good.text
        for s in idle:  # no request head within --client-timeout: closed by the proxy
            s.settimeout(30)
            assert s.recv(4096) == b""
        for s in idle + drips:
            s.close()


def test_a_quota_is_never_crossed_across_periods():
    """A reservation made in one period and settled in the next still counts until it ends:
    no period sees more than the quota reserved or spent."""
    from blackbox_smooth.proxy.service import QuotaExceeded, Quotas

    now = [0.0]
    quotas = Quotas(100, period=10, clock=lambda: now[0])
    quotas.reserve("a", 100)  # a certification that may cost 100, started at t = 0
    now[0] = 11.0  # a new period: the first is still running
    with pytest.raises(QuotaExceeded, match="has 0 of its 100 left"):
        quotas.reserve("a", 100)
    quotas.settle("a", 100, 40)  # it ended having spent 40, charged to this period
    with pytest.raises(QuotaExceeded, match="has 60 of its 100 left"):
        quotas.reserve("a", 61)
    quotas.reserve("a", 60)
    quotas.reserve("b", 100)  # another client has its own quota
    now[0] = 25.0
    quotas.settle("a", 60, 0)
    quotas.reserve("a", 100)  # a later period, nothing outstanding: the whole quota


def test_one_key_cannot_hold_every_body_slot(server, digit_images, tmp_path, monkeypatch):
    """With keys, a client holds at most a quarter of --max-bodies: its slow bodies make it
    wait (503), not the others."""
    monkeypatch.setenv("PROXY_KEYS", "k-one-abcdefghijkl,k-two-mnopqrstuvwx")
    with proxy(server.url, tmp_path, client_keys_env="PROXY_KEYS", max_bodies=4) as (base, s):
        drip = socket.create_connection(("127.0.0.1", s.port))
        drip.sendall(b"POST /v1/certify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Authorization: Bearer k-one-abcdefghijkl\r\n"
                     b"Content-Length: 1000\r\n\r\nabc")  # fmt: skip
        time.sleep(0.3)
        one = post_image(
            base, digit_images[0], headers={"authorization": "Bearer k-one-abcdefghijkl"}
        )
        assert "this key has 1 request bodies in memory" in one_line_error(one, 503)
        two = post_image(
            base, digit_images[0], headers={"authorization": "Bearer k-two-mnopqrstuvwx"}
        )
        assert two.status_code == 200, two.text
        drip.close()
