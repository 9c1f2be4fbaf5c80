"""Loopback servers that answer as vision vendors document it, request and errors alike.

Each vendor is a small function (request → status, headers, JSON body), served in process
(`Vendor(…).transport()`, an httpx transport) or behind a real `ThreadingHTTPServer`
(`VendorServer`) where the socket is the point. They all classify with the same nearest-centroid digit classifier, so a
certificate through any of them can be checked against `reference`, the classifier called
in-process on the same noisy pixels (clipped and rounded to 8 bits, as PNG carries them).

Documentation followed (2026-11):
- Hugging Face: https://huggingface.co/docs/inference-providers/tasks/image-classification
- TorchServe: https://pytorch.org/serve/inference_api.html and
  https://pytorch.org/serve/token_authorization_api.html (bad token: HTTP 400 InvalidKeyException)
- Google Cloud Vision: https://cloud.google.com/vision/docs/request,
  https://cloud.google.com/vision/docs/supported-files (16 images per request, 20 MB per image)
- Azure AI Vision 4.0: https://learn.microsoft.com/azure/ai-services/computer-vision/how-to/call-analyze-image-40
- Clarifai: https://docs.clarifai.com/api-guide/predict/images and
  https://docs.clarifai.com/resources/api-overview/status-codes
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _centroids() -> np.ndarray:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.images.reshape(len(data.images), -1) / 16.0
    return np.stack([x[data.target == k].mean(0) for k in range(10)])


CENTROIDS = _centroids()


def probabilities(pixels: np.ndarray) -> np.ndarray:
    """N×64 uint8 pixels → N×10 class probabilities (nearest centroid, softened)."""
    x = pixels.reshape(len(pixels), -1).astype(np.float64) / 255.0
    d = ((x[:, None, :] - CENTROIDS[None]) ** 2).sum(-1)
    z = np.exp(-(d - d.min(1, keepdims=True)) * 2.0)
    return z / z.sum(1, keepdims=True)


def reference(x: np.ndarray) -> np.ndarray:
    """The vendors' classifier in-process (a `python:` endpoint): x is N×1×8×8 float32 with
    noise, clipped and rounded to 8 bits exactly as the PNG encoder does."""
    pixels = np.round(np.clip(x, 0.0, 1.0) * np.float32(255.0))
    return probabilities(pixels.astype(np.uint8)).argmax(1)


def digit_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def ranked(p: np.ndarray, name: Callable[[int], str], top: int = 5) -> list[tuple[str, float]]:
    order = np.argsort(-p)[:top]
    return [(name(int(k)), float(p[k])) for k in order]


class Request:
    def __init__(self, target: str, headers: dict[str, str], body: bytes) -> None:
        parts = urlsplit(target)
        self.path = parts.path
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], Any]


# -- the vendors -------------------------------------------------------------------------------
def huggingface(req: Request, key: str | None, fault: str | None) -> Reply:
    if key and req.headers.get("authorization") != f"Bearer {key}":
        return 401, {}, {"error": "Invalid credentials in Authorization header"}
    if fault == "quota":
        return (
            429,
            {},
            {"error": "Rate limit reached. You reached free usage limit (reset hourly)."},
        )
    if fault == "loading":
        return 503, {}, {"error": "Model digits is currently loading", "estimated_time": 0.05}
    data, top = req.body, 5  # the raw image: the top 5 labels
    if req.headers.get("content-type") == "application/json":  # the JSON form may ask for more
        body = req.json()
        data, top = base64.b64decode(body["inputs"]), body["parameters"]["top_k"]
    if len(data) > 2_000:
        return 413, {}, {"error": "Payload Too Large"}
    p = probabilities(digit_pixels(data)[None])[0]
    answer = [
        {"label": label, "score": s}
        for label, s in ranked(p, lambda k: f"Digit  {WORDS[k].title()}", top)
    ]
    return 200, {}, answer


def torchserve(req: Request, key: str | None, fault: str | None) -> Reply:
    if not req.path.startswith("/predictions/digits"):
        return (
            404,
            {},
            {
                "code": 404,
                "type": "ModelNotFoundException",
                "message": "Model not found: " + req.path,
            },
        )
    if key and req.headers.get("authorization") != f"Bearer {key}":
        return 400, {}, {"code": 400, "type": "InvalidKeyException",
                         "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}  # fmt: skip
    if fault == "busy":
        return (
            503,
            {},
            {
                "code": 503,
                "type": "ServiceUnavailableException",
                "message": "No worker is available to serve request: digits",
            },
        )
    if len(req.body) > 2_000:
        return (
            413,
            {},
            {"code": 413, "type": "RequestTooLarge", "message": "request exceeds max_request_size"},
        )
    p = probabilities(digit_pixels(req.body)[None])[0]
    return 200, {}, dict(ranked(p, lambda k: WORDS[k]))


def cloud_vision(req: Request, key: str | None, fault: str | None) -> Reply:
    if key and req.query.get("key") != key:
        return 400, {}, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                   "status": "INVALID_ARGUMENT",
                                   "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}  # fmt: skip
    if fault == "quota":
        return 429, {}, {"error": {"code": 429, "message": "Quota exceeded for quota metric 'Requests'.",
                                   "status": "RESOURCE_EXHAUSTED"}}  # fmt: skip
    requests = req.json()["requests"]
    if fault == "foreign":  # words no label map of digits knows
        foreign = [{"mid": "/m/0", "description": "Font", "score": 0.9, "topicality": 0.9}]
        return 200, {}, {"responses": [{"labelAnnotations": foreign} for _ in requests]}
    if len(requests) > 16:
        return 400, {}, {"error": {"code": 400, "message": "Too many images in request: 17 > 16",
                                   "status": "INVALID_ARGUMENT"}}  # fmt: skip
    if len(req.body) > 10_000_000:  # the documented JSON limit per request
        return 400, {}, {"error": {"code": 400, "message": "Request payload size exceeds the limit: 10485760 bytes.",
                                   "status": "INVALID_ARGUMENT"}}  # fmt: skip
    responses = []
    for r in requests:
        (feature,) = r["features"]
        assert feature["type"] == "LABEL_DETECTION" and 1 <= feature["maxResults"] <= 50
        data = base64.b64decode(r["image"]["content"])
        if len(data) > 2_000:
            responses.append({"error": {"code": 3, "message": "Image size exceeds the limit"}})
            continue
        p = probabilities(digit_pixels(data)[None])[0]
        labels = [("Handwriting", 0.97)] + ranked(p, lambda k: f"Number {WORDS[k]}")
        labels = labels[: feature["maxResults"]]
        responses.append({"labelAnnotations": [
            {"mid": f"/m/{i:05d}", "description": d, "score": s, "topicality": s}
            for i, (d, s) in enumerate(labels)]})  # fmt: skip
    return 200, {}, {"responses": responses}


def azure_vision(req: Request, key: str | None, fault: str | None) -> Reply:
    if key and req.headers.get("ocp-apim-subscription-key") != key:
        return 401, {}, {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}  # fmt: skip
    if req.query.get("features") != "tags" or not req.query.get("api-version"):
        return (
            400,
            {},
            {
                "error": {
                    "code": "InvalidRequest",
                    "message": "features=tags and api-version required",
                }
            },
        )
    if fault == "quota":
        return 429, {"retry-after": "0"}, {"error": {"code": "429", "message": "Requests to the Analyze Image Operation under Computer Vision API have exceeded rate limit. Please retry after 0 seconds."}}  # fmt: skip
    if len(req.body) > 2_000:
        return 400, {}, {"error": {"code": "InvalidRequest", "message": "The image size is not allowed to be zero or larger than 2000 bytes.",
                                   "innererror": {"code": "InvalidImageSize", "message": "Image size too large."}}}  # fmt: skip
    p = probabilities(digit_pixels(req.body)[None])[0]
    tags = [("text", 0.99)] + ranked(p, lambda k: WORDS[k])
    return 200, {}, {"modelVersion": "2023-10-01", "metadata": {"width": 8, "height": 8},
                     "tagsResult": {"values": [{"name": n, "confidence": s} for n, s in tags]}}  # fmt: skip


def clarifai(req: Request, key: str | None, fault: str | None) -> Reply:
    if key and req.headers.get("authorization") != f"Key {key}":
        return (
            401,
            {},
            {
                "status": {
                    "code": 11008,
                    "description": "Invalid API key or Invalid API key/application pair",
                }
            },
        )
    if fault == "throttled":  # documented as a status in a 200-family answer body
        return 200, {}, {"status": {"code": 11005, "description": "Making too many requests",
                                    "details": "exceeded limit of 15 requests per second"}}  # fmt: skip
    if fault == "loading":  # MODEL_LOADING in clarifai-grpc's status_code.proto
        return 200, {}, {"status": {"code": 21355, "description": "Model is loading"}}
    if fault == "busy":  # MODEL_BUSY_PLEASE_RETRY
        return 200, {}, {"status": {"code": 21354, "description": "Model is busy, please retry"}}
    inputs = req.json()["inputs"]
    outputs = []
    for item in inputs:
        data = base64.b64decode(item["data"]["image"]["base64"])
        p = probabilities(digit_pixels(data)[None])[0]
        concepts = [{"id": f"ai_{n}", "name": n, "value": s, "app_id": "main"}
                    for n, s in ranked(p, lambda k: WORDS[k])]  # fmt: skip
        outputs.append(
            {"status": {"code": 10000, "description": "Ok"}, "data": {"concepts": concepts}}
        )
    return (
        200,
        {},
        {"status": {"code": 10000, "description": "Ok", "req_id": "r"}, "outputs": outputs},
    )


KSERVE_METADATA = {
    "name": "digits",
    "versions": ["1"],
    "platform": "onnxruntime_onnx",
    "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}


def kserve(req: Request, key: str | None, fault: str | None) -> Reply:
    """An Open Inference Protocol server that publishes its metadata (as Triton does) and
    insists on it: input 'pixels', UINT8, N×H×W×C."""
    if key and req.headers.get("authorization") != f"Bearer {key}":
        return 401, {}, {"error": "unauthorized"}
    if req.body == b"":  # GET /v2/models/digits
        return 200, {}, KSERVE_METADATA
    (tensor,) = req.json()["inputs"]
    if (
        tensor["name"] != "pixels"
        or tensor["datatype"] != "UINT8"
        or tensor["shape"][1:] != [8, 8, 1]
    ):
        return (
            400,
            {},
            {
                "error": f"expected pixels UINT8 [-1,8,8,1], got {tensor['name']} {tensor['datatype']} {tensor['shape']}"
            },
        )
    pixels = np.asarray(tensor["data"], dtype=np.uint8).reshape(tensor["shape"])
    p = probabilities(pixels)
    return 200, {}, {"model_name": "digits", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": list(p.shape), "data": p.ravel().tolist()}]}  # fmt: skip


VENDORS: dict[str, Callable[[Request, str | None, str | None], Reply]] = {
    "huggingface": huggingface,
    "torchserve": torchserve,
    "gcv": cloud_vision,
    "azure": azure_vision,
    "clarifai": clarifai,
    "kserve": kserve,
}

PATHS = {
    "huggingface": "/models/acme/digits",
    "torchserve": "/predictions/digits",
    "gcv": "/v1/images:annotate",
    "azure": "/computervision/imageanalysis:analyze?api-version=2023-10-01&features=tags",
    "clarifai": "/v2/users/acme/apps/digits/models/digits-clf/outputs",
    "kserve": "/v2/models/digits/infer",
}


class Vendor:
    """One vendor's answers, whatever carries the requests: `Vendor("gcv", key="k",
    faults={0: "quota"}).transport()` in process, `VendorServer(…)` on a loopback socket."""

    def __init__(
        self,
        vendor: str,
        key: str | None = None,
        faults: dict[int, str] | None = None,
        echo_key: bool = False,
    ) -> None:
        self.vendor, self.key, self.faults, self.echo_key = vendor, key, faults or {}, echo_key
        self.requests = 0
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1{PATHS[vendor]}"  # loopback: a key may travel by http

    def answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body for one request (`target`: path and query)."""
        if method == "GET":
            if self.vendor != "kserve" or target != "/v2/models/digits":
                return _encoded(404, {}, {"error": f"no route {target}"})
            return _encoded(*VENDORS["kserve"](Request(target, headers, b""), self.key, None))
        with self.lock:
            index = self.requests
            self.requests += 1
        fault = self.faults.get(index)
        status, extra, answer = VENDORS[self.vendor](
            Request(target, headers, body), self.key, fault
        )
        if self.echo_key and status >= 400:  # a careless server: the key in its error
            answer = {"error": f"bad request at {target} with headers {headers}"}
        return _encoded(status, extra, answer)

    def transport(self) -> httpx.MockTransport:
        """The vendor in process, for `open_blackbox(…, httpx_transport=…)`."""

        def handle(request: httpx.Request) -> httpx.Response:
            target = request.url.raw_path.decode()
            status, headers, blob = self.answer(
                request.method, target, dict(request.headers), request.content
            )
            return httpx.Response(status, headers=headers, content=blob)

        return httpx.MockTransport(handle)

    def __enter__(self) -> Vendor:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _encoded(status: int, headers: dict[str, str], answer: Any) -> tuple[int, dict, bytes]:
    return status, {"content-type": "application/json", **headers}, json.dumps(answer).encode()


class VendorServer(Vendor):
    """The same vendor behind a real `ThreadingHTTPServer` on 127.0.0.1, for the tests where
    the socket is the point (TLS, a CLI run): `with VendorServer("gcv") as s: s.url`."""

    def __init__(
        self,
        vendor: str,
        key: str | None = None,
        faults: dict[int, str] | None = None,
        echo_key: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(vendor, key, faults, echo_key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(  # handshake in the handler thread, not in accept
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}{PATHS[vendor]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._reply(*server.answer("GET", self.path, dict(self.headers), b""))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                self._reply(*server.answer("POST", self.path, dict(self.headers), body))

            def _reply(self, status: int, headers: dict[str, str], blob: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", str(len(blob)))
                self.end_headers()
                # the client may have given up on this request (a test stopped it on purpose)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(blob)

        return Handler

    def __enter__(self) -> VendorServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
