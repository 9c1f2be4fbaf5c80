"""`bbsmooth proxy` as its own process, where the process is the point: SIGTERM drains the
requests in flight, kill -9 and a restart lose nothing that was answered, TLS with a test CA,
and a client's key never appears in what the process prints."""

from __future__ import annotations

import os
import signal
import ssl
import threading

import httpx
import pytest
import trustme

from blackbox_smooth.serve import InferenceServer, free_port

from .harness import _command, serving

pytestmark = pytest.mark.process  # every test here starts a process of its own

COMMON = ["--sigma", "0.25", "--n0", "50", "--n", "500", "--size", "28x28", "--grayscale"]


def proxy_command(upstream: str, port: int, cache, *extra) -> list[str]:
    return _command(["proxy", "-e", upstream, *COMMON, "--port", port, "--cache", cache, *extra])


def test_sigterm_drains_the_request_in_flight(digits_torch, digit_images, tmp_path):
    port = free_port()
    with InferenceServer(digits_torch, name="digits", delay=0.2) as slow:
        command = proxy_command(slow.url, port, tmp_path / "cache", "--shutdown-grace", "60")
        with serving(command, f"http://127.0.0.1:{port}/readyz", tmp_path / "log") as proc:
            answers: list[httpx.Response] = []

            def ask() -> None:
                answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/certify",
                                          content=digit_images[0].read_bytes(), timeout=120,
                                          headers={"content-type": "image/png"}))  # fmt: skip

            asker = threading.Thread(target=ask)
            asker.start()
            while slow.images < 100:  # the certification is under way upstream
                threading.Event().wait(0.05)
            os.kill(proc.pid, signal.SIGTERM)
            asker.join(120)
            code = proc.wait(120)
    assert answers and answers[0].status_code == 200, answers
    assert answers[0].json()["queries_sent"] == 550
    assert code == -signal.SIGTERM  # after the drain, ended by the signal, as uvicorn does


def test_kill_9_and_restart_lose_nothing_answered(digits_torch, digit_images, tmp_path):
    cache = tmp_path / "cache"
    with InferenceServer(digits_torch, name="digits") as upstream:
        port = free_port()
        command = proxy_command(upstream.url, port, cache)
        base = f"http://127.0.0.1:{port}"
        with serving(command, f"{base}/readyz", tmp_path / "log1") as proc:
            first = httpx.post(f"{base}/v1/certify", content=digit_images[1].read_bytes(),
                               headers={"content-type": "image/png"}, timeout=120).json()  # fmt: skip
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        seen = upstream.images
        with serving(proxy_command(upstream.url, port, cache), f"{base}/readyz",
                     tmp_path / "log2"):  # fmt: skip
            again = httpx.post(f"{base}/v1/certify", content=digit_images[1].read_bytes(),
                               headers={"content-type": "image/png"}, timeout=120).json()  # fmt: skip
        # after the restart: the readiness probe and the canary (8 cached samples asked again)
        assert upstream.images - seen == 1 + 8
    assert again["queries_sent"] == 8 and again["queries_replayed"] == 550
    assert (again["label"], again["radius"]) == (first["label"], first["radius"])


def test_tls_with_a_test_ca_and_keys_kept_out_of_the_log(digits_torch, digit_images, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    keys = tmp_path / "keys"
    keys.write_text("the-client-key-000111222\n")
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    with InferenceServer(digits_torch, name="digits") as upstream:
        command = proxy_command(upstream.url, port, tmp_path / "cache", "--tls-key",
                                tmp_path / "key.pem", "--tls-cert", tmp_path / "cert.pem",
                                "--client-keys-file", keys)  # fmt: skip
        log = tmp_path / "log"
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with serving(command, f"{base}/healthz", log, verify=trusted):
            client = httpx.Client(verify=trusted, timeout=120)
            ok = client.post(f"{base}/v1/certify", content=digit_images[2].read_bytes(),
                             headers={"content-type": "image/png",
                                      "authorization": "Bearer the-client-key-000111222"})  # fmt: skip
            denied = client.post(f"{base}/v1/certify", content=b"x",
                                 headers={"authorization": "Bearer the-client-key-0001112"})  # fmt: skip
            client.close()
    assert ok.status_code == 200, ok.text
    assert denied.status_code == 401
    assert "the-client-key" not in log.read_text()
