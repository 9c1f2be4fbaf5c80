"""Vendor adapters against servers that answer in each vendor's documented format
(tests/vendors.py names the pages), label maps, auth and the keys that must never leak. The
vendors answer in process (an injected httpx transport); a loopback server stays where the
socket is the point: TLS and the CLI's runs."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from blackbox_smooth.adapters import EndpointOptions, LabelMap, gcv, open_blackbox
from blackbox_smooth.adapters.auth import Auth
from blackbox_smooth.adapters.generic import select
from blackbox_smooth.blackbox import OTHER
from blackbox_smooth.data import save_image
from blackbox_smooth.errors import EndpointError, ProtocolError, UsageError
from blackbox_smooth.smooth import Smoothed

from .conftest import ROOT, run_cli
from .vendors import WORDS, Vendor, VendorServer

EXAMPLES = ROOT / "examples" / "vendors"
REFERENCE = f"python:{ROOT / 'tests' / 'vendors.py'}:reference"
KEY = "sk-test-9f8e7d6c5b4a"
FAST_RETRY = {"retries": 4, "backoff": 0.01, "max_backoff": 0.05}


def digit(i: int) -> tuple[np.ndarray, int]:
    data = load_digits()
    x = np.round(data.images[i] / 16.0 * 255) / 255
    return x[None].astype(np.float32), int(data.target[i])


def label_map(tmp_path: Path, vendor: str) -> Path:
    """The map a user would write after `bbsmooth labels`: vendor words → digit classes."""
    names = {
        "huggingface": "digit {w}",  # the server answers "Digit  Three": case and spaces vary
        "torchserve": "{w}",
        "gcv": "number {w}",  # "Handwriting" (the top label) stays unmapped
        "azure": "{w}",
        "clarifai": "{w}",
    }[vendor]
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({names.format(w=w): k for k, w in enumerate(WORDS)}))
    return path


def options(tmp_path: Path, vendor: str, **kw) -> EndpointOptions:
    protocol = {"azure": "generic", "clarifai": "generic"}.get(vendor, vendor)
    config = {"azure": EXAMPLES / "azure-vision-tags.json", "clarifai": EXAMPLES / "clarifai.json"}
    base = {
        "protocol": protocol,
        "protocol_config": str(config[vendor]) if vendor in config else None,
        "labels": str(label_map(tmp_path, vendor)),
        **FAST_RETRY,
        "auth": {"huggingface": None}.get(vendor),
    }
    return EndpointOptions(**{**base, **kw})


def opened(vendor: Vendor, opts: EndpointOptions):
    """The black box for `vendor`: in process, unless it is a loopback server."""
    wire = None if isinstance(vendor, VendorServer) else vendor.transport()
    return open_blackbox(vendor.url, opts, httpx_transport=wire)


def certify(spec: str | Vendor, opts: EndpointOptions | None, x: np.ndarray, **kw):
    box = open_blackbox(spec, opts) if isinstance(spec, str) else opened(spec, opts)
    return Smoothed(box, 0.25, seed=3, **kw).certify_sync(x, n0=16, n=64, alpha=0.01)


VENDORS = ["huggingface", "torchserve", "gcv", "azure", "clarifai"]


@pytest.mark.parametrize("vendor", VENDORS)
def test_vendor_certificate_equals_the_classifier_called_in_process(vendor, tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    x, y = digit(3)
    with Vendor(vendor, key=KEY) as server:
        remote = certify(server, options(tmp_path, vendor), x)
        expected_requests = 80 if vendor != "gcv" else 5  # one image each; GCV: 16 per request
        assert server.requests == expected_requests
    local = certify(REFERENCE, None, x)
    assert remote.counts == local.counts and remote.counts_selection == local.counts_selection
    assert remote.label == local.label == y
    assert remote.radius == local.radius > 0


@pytest.mark.parametrize(
    ("vendor", "faults"),
    [
        ("huggingface", {0: "quota", 1: "loading", 5: "loading"}),
        ("torchserve", {0: "busy", 2: "busy"}),
        ("gcv", {0: "quota", 1: "quota"}),
        ("azure", {0: "quota", 3: "quota"}),
        ("clarifai", {0: "throttled", 4: "throttled"}),  # an error status in a 200 answer
        ("clarifai", {0: "loading", 1: "busy", 3: "loading"}),  # the model warming up
    ],
)
def test_vendor_rate_limits_and_busy_answers_are_retried(vendor, faults, tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    x, _ = digit(7)
    with Vendor(vendor, key=KEY, faults=faults) as server:
        faulty = certify(server, options(tmp_path, vendor), x)
        assert server.requests > (80 if vendor != "gcv" else 5)  # the faults were retried
    assert faulty.counts == certify(REFERENCE, None, x).counts


@pytest.mark.parametrize(
    ("vendor", "says"),
    [
        ("huggingface", 'HTTP 401: {"error": "Invalid credentials in Authorization header"}'),
        ("torchserve", "InvalidKeyException"),
        ("gcv", "API key not valid"),
        ("azure", "Access denied due to invalid subscription key"),
        ("clarifai", "Invalid API key"),
    ],
)
def test_a_wrong_key_stops_at_once_with_the_vendors_words_and_a_hint(
    vendor, says, tmp_path, monkeypatch
):
    monkeypatch.setenv("BBSMOOTH_API_KEY", "wrong-" + KEY)
    with Vendor(vendor, key=KEY) as server:
        with pytest.raises(EndpointError) as err:
            certify(server, options(tmp_path, vendor), digit(0)[0])
        assert server.requests <= (16 if vendor != "gcv" else 1)  # never retried
    message = str(err.value)
    assert says in message and "BBSMOOTH_API_KEY" in message
    assert KEY not in message and "wrong-" not in message and "\n" not in message


@pytest.mark.parametrize("vendor", ["huggingface", "torchserve", "azure"])
def test_an_image_too_large_for_the_vendor_is_refused_with_its_words(vendor, tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    x = np.random.default_rng(0).random((1, 48, 48), dtype=np.float32)  # noise: ~2.3 kB of PNG
    with Vendor(vendor, key=KEY) as server, pytest.raises(EndpointError) as err:
        certify(server, options(tmp_path, vendor), x)
    assert str(err.value).count("HTTP 4") == 1 and ("large" in str(err.value).lower())


def test_cloud_vision_per_image_error_for_a_large_image_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    x = np.random.default_rng(0).random((1, 48, 48), dtype=np.float32)
    with Vendor("gcv", key=KEY) as server, pytest.raises(UsageError, match="Image size"):
        certify(server, options(tmp_path, "gcv"), x)
    assert server.requests == 1


def test_the_clients_own_size_limit_stops_before_anything_is_sent(tmp_path):
    config = json.loads((EXAMPLES / "azure-vision-tags.json").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps({**config, "max_image_bytes": 100}))
    opts = options(tmp_path, "azure", protocol_config=str(tmp_path / "tiny.json"))
    with Vendor("azure") as server, pytest.raises(UsageError, match="over generic's limit"):
        certify(server, opts, digit(0)[0])
    assert server.requests == 0


def test_kserve_reads_input_name_layout_and_dtype_from_model_metadata():
    """The server insists on its published input (pixels, UINT8, N×8×8×1): only read from
    the metadata does the request fit. The scale (255 for uint8) follows the dtype."""
    x, y = digit(3)
    with Vendor("kserve") as server:
        box = opened(server, EndpointOptions(**FAST_RETRY))
        assert (box.options.input_name, box.options.input_layout, box.options.input_dtype) == (
            "pixels", "nhwc", "uint8",
        )  # fmt: skip
        remote = Smoothed(box, 0.25, seed=3).certify_sync(x, n0=16, n=64, alpha=0.01)
    assert remote.counts == certify(REFERENCE, None, x).counts and remote.label == y


def test_without_a_label_map_vendor_words_are_refused_with_a_way_forward(tmp_path):
    with Vendor("torchserve") as server, pytest.raises(UsageError) as err:
        certify(server, options(tmp_path, "torchserve", labels=None), digit(0)[0])
    assert "--labels" in str(err.value) and "bbsmooth labels" in str(err.value)


def test_unmapped_answers_vote_other_never_for_a_class(tmp_path, monkeypatch):
    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    path = tmp_path / "pets.csv"
    path.write_text("label,class\nTabby cat,cat\nBeagle,dog\n")  # the vendor answers neither
    opts = options(tmp_path, "gcv", labels=str(path))
    with Vendor("gcv", key=KEY) as server:
        cert = certify(server, opts, digit(0)[0])
    assert cert.abstain and cert.counts == {OTHER: 64}


def test_label_map_files(tmp_path):
    j = tmp_path / "m.json"
    j.write_text(
        json.dumps({"Tabby cat": "cat", " tabby   CAT ": "cat", "Beagle": "dog", "Pug": "dog"})
    )
    m = LabelMap.load(j)
    assert m.classes == ("cat", "dog")
    assert m.lookup("TABBY cat") == 0 and m.lookup("pug") == 1 and m.lookup("Car") is None
    assert m.resolve([("Car", 0.99), ("Beagle", 0.4), ("tabby cat", 0.6)]) == 0
    assert m.resolve([("Car", 0.99), ("Truck", 0.5)]) == OTHER and m.resolve([]) == OTHER
    c = tmp_path / "m.csv"
    c.write_text("vendor,class\nTabby cat,1\nBeagle,0\n\n")
    assert LabelMap.load(c).lookup("tabby cat") == 1 and LabelMap.load(c).classes == ("0", "1")
    assert LabelMap.load(j).digest == m.digest != LabelMap.load(c).digest
    identity = LabelMap.identity()
    assert identity.lookup("LABEL_3") == 3 and identity.lookup(" 7 ") == 7
    assert identity.lookup("cat") is None


@pytest.mark.parametrize(
    ("text", "suffix", "says"),
    [
        ('{"cat": "a", "CAT": "b"}', "json", "two classes"),
        ("{}", "json", "empty"),
        ("[1, 2]", "json", "JSON object"),
        ('{"cat": [1]}', "json", "not a class"),
        ("{nope", "json", "not valid JSON"),
        ("cat,a,b\n", "csv", "3 columns"),
        (",a\n", "csv", "empty vendor label"),
    ],
)
def test_bad_label_maps_are_refused_in_one_line(tmp_path, text, suffix, says):
    path = tmp_path / f"m.{suffix}"
    path.write_text(text)
    with pytest.raises(UsageError, match=says):
        LabelMap.load(path)


def test_the_label_map_is_part_of_the_fingerprint(tmp_path):
    with Vendor("torchserve") as server:
        a = opened(server, options(tmp_path, "torchserve"))
        other = tmp_path / "other.json"
        other.write_text(json.dumps({w: (k + 1) % 10 for k, w in enumerate(WORDS)}))
        b = opened(server, options(tmp_path, "torchserve", labels=str(other)))
        c = opened(server, options(tmp_path, "torchserve", encoding="jpeg", jpeg_quality=90))
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


def test_protocol_from_the_url_and_errors_that_say_how_to_choose(tmp_path):
    from blackbox_smooth.adapters import detect_protocol

    assert detect_protocol("https://h/v2/models/m/infer") == "kserve"
    assert detect_protocol("https://vision.googleapis.com/v1/images:annotate") == "gcv"
    assert detect_protocol("https://router.huggingface.co/hf-inference/models/a/b") == "huggingface"
    assert detect_protocol("https://x.us-east-1.aws.endpoints.huggingface.cloud") == "huggingface"
    assert detect_protocol("http://localhost:8080/predictions/resnet/2.0") == "torchserve"
    assert detect_protocol("https://example.com/classify") is None
    with pytest.raises(UsageError, match=re.escape("--protocol kserve|huggingface")):
        open_blackbox("https://example.com/classify")
    with pytest.raises(UsageError, match="holds credentials"):
        open_blackbox(f"https://user:{KEY}@example.com/predictions/m")
    with pytest.raises(UsageError, match="--protocol-config"):
        open_blackbox("https://example.com/c", EndpointOptions(protocol="generic"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labels": "a.b", "headers": {"Authorization": "Bearer x"}}))
    with pytest.raises(UsageError, match="no credentials"):
        open_blackbox("https://example.com/c", EndpointOptions(protocol_config=str(bad)))


def test_auth_styles_put_the_key_where_the_vendor_expects_it(monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    for style, header, value in (
        ("bearer", "authorization", f"Bearer {KEY}"),
        ("key", "authorization", f"Key {KEY}"),
        ("header:x-api-key", "x-api-key", KEY),
    ):
        headers: dict[str, str] = {}
        assert Auth(style, "MY_KEY").apply("https://h/p?a=1", headers) == "https://h/p?a=1"
        assert headers == {header: value}
    assert Auth("query:key", "MY_KEY").apply("https://h/p?a=1", {}) == f"https://h/p?a=1&key={KEY}"
    untouched: dict[str, str] = {}
    assert Auth("bearer", "UNSET_VAR").apply("https://h/p", untouched) == "https://h/p"
    assert untouched == {}
    with pytest.raises(UsageError, match="--auth"):
        Auth("cookie")


def test_json_paths():
    doc = {"a": {"b": [{"c": 1}, {"c": 2}]}, "o": [[{"n": "x"}]]}
    assert select(doc, "a.b[*].c") == [1, 2] and select(doc, "a.b[1].c") == [2]
    assert select(doc, "o[0][0].n") == ["x"]
    for path in ("a.x", "a.b[5].c", "a.b.c"):
        with pytest.raises(EndpointError):
            select(doc, path)


def test_cli_labels_then_certify_with_the_map_and_a_key_that_never_leaks(tmp_path):
    """`bbsmooth labels` shows the vendor's words; with a map, certify; the key, which the
    server echoes in its errors, appears in no output, cache entry or file."""
    image = tmp_path / "three.png"
    save_image(digit(3)[0], image)
    cache = tmp_path / "cache"
    env = {"VISION_KEY": KEY}
    common = ["--api-key-env", "VISION_KEY", "--cache", str(cache), "--retries", "2"]
    with VendorServer("gcv", key=KEY) as server:
        shown = run_cli("labels", image, "--endpoint", server.url, *common[:2], env=env)
        assert shown.returncode == 0, shown.stderr
        assert "Handwriting" in shown.stdout and "Number three" in shown.stdout
        assert "OTHER" in shown.stdout  # no map yet: words are not classes
        labels = label_map(tmp_path, "gcv")
        mapped = run_cli(
            "labels", image, "-e", server.url, "--labels", labels, *common[:2], env=env
        )
        assert "→ 3" in mapped.stdout
        ok = run_cli("certify", image, "-e", server.url, "--labels", labels, "--sigma", "0.25",
                     "--n0", "16", "--n", "64", "--alpha", "0.01", "--seed", "3", *common, env=env)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert f"{image.name}  3" in ok.stdout
        data = tmp_path / "data"
        data.mkdir()
        for i in range(12):
            save_image(digit(i)[0], data / f"{i}.png")
        run = tmp_path / "run"
        trained = run_cli("train", "-e", server.url, "--labels", labels, "--data", data,
                          "--sigma", "0.25", "--out", run, "--max-queries", "400", "--epochs", "1",
                          "--pretrain-epochs", "1", "--force", *common, env=env)  # fmt: skip
        assert trained.returncode == 0, trained.stderr
    with VendorServer("gcv", key="another-key", echo_key=True) as echo:
        bad = run_cli("certify", image, "-e", echo.url, "--labels", labels, "--sigma", "0.25",
                      "--n", "64", *common, env=env)  # fmt: skip
        assert bad.returncode == 3 and bad.stderr.count("\n") == 1 and "***" in bad.stderr
    for out in (shown, mapped, ok, trained, bad):
        assert KEY not in out.stdout + out.stderr
    for folder in (cache, run):  # answers cached, a checkpoint saved: the key in neither
        stored = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
        assert len(stored) > 0 and KEY.encode() not in stored


def test_tls_is_verified_and_a_private_ca_bundle_is_trusted(tmp_path, monkeypatch):
    """A real TLS server with a certificate from a private CA: refused by default, trusted with
    --ca-bundle."""
    import ssl

    import trustme

    monkeypatch.setenv("BBSMOOTH_API_KEY", KEY)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    x = digit(3)[0]
    with VendorServer("torchserve", key=KEY, tls=context) as server:
        assert server.url.startswith("https://")
        with pytest.raises(EndpointError, match="CERTIFICATE_VERIFY_FAILED|ConnectError"):
            certify(server.url, options(tmp_path, "torchserve", retries=1), x)
        trusted = certify(server.url, options(tmp_path, "torchserve", ca_bundle=str(bundle)), x)
    assert trusted.counts == certify(REFERENCE, None, x).counts
    with pytest.raises(UsageError, match="--ca-bundle"):
        open_blackbox(server.url, EndpointOptions(ca_bundle=str(tmp_path / "none.pem")))


def test_encoded_images_are_sent_at_noise_resolution(tmp_path):
    """What the vendor receives is the noisy image at the size the noise was added."""
    from blackbox_smooth.adapters import Encoding

    images = torch.rand(2, 3, 37, 23)
    for enc in (Encoding("png"), Encoding("jpeg", 80)):
        files = enc.encode(images)
        with Image.open(io.BytesIO(files[0])) as img:
            assert img.size == (23, 37) and img.format == enc.format.upper()
    with pytest.raises(UsageError, match="jpeg-quality"):
        Encoding("jpeg", 0)


def test_a_vendor_configs_fixed_headers_are_sent(tmp_path):
    import asyncio

    from .hostile import HostileServer

    config = tmp_path / "v.json"
    config.write_text(json.dumps({"labels": "[*].label", "scores": "[*].score", "auth": "none",
                                  "headers": {"X-Version": "2024-01"}}))  # fmt: skip
    with HostileServer() as server:
        box = open_blackbox(server.url("header-as-label"),
                            EndpointOptions(protocol_config=str(config)))  # fmt: skip

        async def ask():
            try:
                return await box.annotate(torch.zeros(1, 1, 8, 8))
            finally:
                await box.aclose()

        assert asyncio.run(ask()) == [[("2024-01", 1.0)]]


def test_hugging_face_answers_more_than_five_labels_with_top_k(tmp_path):
    """The default answer holds the top 5 labels; --top-k sends the JSON form and gets K.
    K is part of the fingerprint (more labels can change which one maps first); the default's
    fingerprint is what it always was."""
    x = torch.from_numpy(digit(3)[0])[None]
    with Vendor("huggingface") as server:
        plain = opened(server, options(tmp_path, "huggingface"))
        more = opened(server, options(tmp_path, "huggingface", top_k=10))
        assert len(asyncio.run(plain.annotate(x))[0]) == 5
        assert len(asyncio.run(more.annotate(x))[0]) == 10
        assert plain.fingerprint != more.fingerprint and "top_k" not in plain.description
        assert asyncio.run(more.classify(x)).labels.tolist() == [3]


def test_cloud_vision_takes_top_k_as_max_results(tmp_path):
    x = torch.from_numpy(digit(3)[0])[None]
    with Vendor("gcv") as server:
        box = opened(server, options(tmp_path, "gcv", top_k=3))
        assert len(asyncio.run(box.annotate(x))[0]) == 3  # Handwriting and two numbers


def test_top_k_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(UsageError, match="--top-k applies to Hugging Face and Cloud Vision"):
        open_blackbox(
            "http://127.0.0.1:1/predictions/digits", options(tmp_path, "torchserve", top_k=3)
        )


def test_cloud_vision_requests_stay_within_its_request_size(tmp_path, monkeypatch):
    """Cloud Vision takes at most 10 MB of JSON per request, whatever the images: a batch
    whose files would exceed it goes as several requests, answers in order. (The limit is
    lowered here so that digits exceed it; `requests_within` is checked at 10 MB below.)"""
    monkeypatch.setattr(gcv, "MAX_REQUEST_BYTES", 2_000)
    x = torch.from_numpy(np.stack([digit(i)[0] for i in range(16)]))
    with Vendor("gcv") as server:
        box = opened(server, options(tmp_path, "gcv"))
        labels = asyncio.run(box.classify(x)).labels
        assert server.requests > 1
        monkeypatch.setattr(gcv, "MAX_REQUEST_BYTES", 10_000_000)
        before = server.requests
        assert asyncio.run(box.classify(x)).labels.tolist() == labels.tolist()
        assert server.requests == before + 1  # all 16 fit one request at the real limit
    # 16 noisy 512×512 PNGs of ~1 MB each: 15.8 MB of JSON in one request before; now each
    # request's JSON is under 10 MB and every file goes exactly once, in order
    files = [bytes([i]) * 1_000_000 for i in range(16)]
    groups = gcv.requests_within(files, gcv.MAX_REQUEST_BYTES)
    assert [f for g in groups for f in g] == files and len(groups) == 3
    for g in groups:
        body = box.request(g)
        assert len(json.dumps(body)) <= 10_000_000


def test_a_cloud_vision_response_with_labels_and_an_error_keeps_its_labels():
    both = {"responses": [{"labelAnnotations": [{"description": "Number three", "score": 0.9}],
                           "error": {"code": 13, "message": "a feature failed"}}]}  # fmt: skip
    assert gcv.parse(both, 1) == [[("Number three", 0.9)]]
    alone = {"responses": [{"error": {"code": 13, "message": "internal"}}]}
    with pytest.raises(ProtocolError, match="could not label image 0"):
        gcv.parse(alone, 1)
