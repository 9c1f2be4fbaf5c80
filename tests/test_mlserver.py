"""Integration with a real serving product: MLServer (Seldon) serving a scikit-learn digits
classifier over the Open Inference Protocol, from its own environment (.venv-mlserver, made by
`make test`). Certificates through it must equal the model called in-process on the same noise.
"""

from __future__ import annotations

import json
import textwrap

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from blackbox_smooth.data import save_image
from blackbox_smooth.serve import free_port

from .conftest import ROOT, run_cli
from .harness import serving

pytestmark = pytest.mark.process  # every test here starts a process of its own

MLSERVER = ROOT / ".venv-mlserver" / "bin" / "mlserver"
WIRE = ["--input-layout", "flat", "--input-scale", "16"]  # sklearn's digits: 64 values, 0–16


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    if not MLSERVER.exists():
        pytest.fail("MLServer is not installed: `make test` creates .venv-mlserver")
    root = tmp_path_factory.mktemp("mlserver")
    x, y = load_digits(return_X_y=True)
    (root / "digits").mkdir()
    joblib.dump(LogisticRegression(max_iter=5000).fit(x, y), root / "digits" / "model.joblib")
    port = free_port()
    settings = {
        "host": "127.0.0.1",  # MLServer binds 0.0.0.0 unless told
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "parallel_workers": 0,
    }
    (root / "settings.json").write_text(json.dumps(settings))
    (root / "digits" / "model-settings.json").write_text(json.dumps({
        "name": "digits",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib"},
    }))  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    command = [str(MLSERVER), "start", str(root)]
    with serving(command, f"{base}/v2/models/digits/ready", root / "mlserver.log"):
        yield {"url": f"{base}/v2/models/digits/infer", "model": root / "digits" / "model.joblib"}


def test_certificates_through_mlserver_equal_the_model_in_process(mlserver, tmp_path):
    data = load_digits()
    images = []
    for i in (0, 1, 2, 3):
        path = tmp_path / f"d{i}_{data.target[i]}.png"
        save_image((data.images[i] / 16.0)[None], path)
        images.append(path)
    reference = tmp_path / "reference.py"
    reference.write_text(
        textwrap.dedent(f"""
        import joblib
        import numpy as np

        MODEL = joblib.load({str(mlserver["model"])!r})

        def predict(x):
            # what the wire does: clip, then the 0-16 scale, float32, flattened
            v = (np.clip(x, 0.0, 1.0) * np.float32(16.0)).reshape(len(x), -1)
            return MODEL.predict(v.astype(np.float32))
    """)
    )
    common = ["--sigma", "0.25", "--n0", "50", "--n", "500", "--seed", "11", "--json", "--no-cache"]
    served = run_cli("certify", *images, "-e", mlserver["url"], *WIRE, *common)
    assert served.returncode == 0, served.stderr
    local = run_cli("certify", *images, "-e", f"python:{reference}:predict", *common)
    assert local.returncode == 0, local.stderr
    a = [json.loads(line) for line in served.stdout.splitlines()]
    b = [json.loads(line) for line in local.stdout.splitlines()]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b, strict=True):
        assert ra["counts"] == rb["counts"] and ra["label"] == rb["label"]
        assert ra["queries_sent"] == 550
    truth = [int(p.stem.split("_")[1]) for p in images]
    assert sum(r["label"] == t for r, t in zip(a, truth, strict=True)) >= 3
    assert np.mean([r["radius"] for r in a]) > 0.1


def test_the_proxy_in_front_of_mlserver_answers_as_certify_does(mlserver, tmp_path):
    """`bbsmooth proxy` (uvicorn, in a thread here) with MLServer upstream: the certificate of
    `bbsmooth certify` with the same settings for each of 20 identical requests at once (those
    that arrive while a certification is under way share it; MLServer answers too fast here to
    say how many do: the coalescing itself is tested with a slow upstream in test_proxy.py)."""
    import threading

    import httpx

    from blackbox_smooth import jobs
    from blackbox_smooth.options import (
        CertifyOptions,
        EndpointOptions,
        ImageOptions,
        ProxyOptions,
        SmoothingOptions,
    )

    data = load_digits()
    image = tmp_path / "d5.png"
    save_image((data.images[5] / 16.0)[None], image)
    wire = EndpointOptions(input_layout="flat", input_scale=16.0)
    options = SmoothingOptions(endpoint=mlserver["url"], sigma=0.25, seed=11, no_cache=True,
                               wire=wire)  # fmt: skip
    server = jobs.proxy(options, CertifyOptions(n0=50, n=500),
                        ImageOptions(size="8x8", grayscale=True), ProxyOptions(port=0))  # fmt: skip
    answers: list[dict] = []
    with server.in_thread():
        url = f"{server.url}/v1/certify"

        def ask() -> None:
            r = httpx.post(url, content=image.read_bytes(), timeout=120,
                           headers={"content-type": "image/png"})  # fmt: skip
            answers.append(r.json())

        threads = [threading.Thread(target=ask) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    cli = run_cli("certify", image, "-e", mlserver["url"], *WIRE, "--sigma", "0.25", "--n0",
                  "50", "--n", "500", "--seed", "11", "--json", "--no-cache")  # fmt: skip
    expected = json.loads(cli.stdout)
    assert len(answers) == 20
    for a in answers:
        assert (a["label"], a["radius"], a["p_lower"]) == (
            expected["label"], expected["radius"], expected["p_lower"]
        )  # fmt: skip
    assert {a["queries_sent"] for a in answers} <= {0, 550}  # a certification, or a share
