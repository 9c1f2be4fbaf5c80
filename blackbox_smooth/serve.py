"""A small Open Inference Protocol (KServe V2) server for a local classifier, on loopback.

`bbsmooth serve --endpoint torch:model.pt --name digits` puts a model file behind the same
HTTP protocol Triton, MLServer and KServe speak; the demo, the tests and the benchmarks query it
like any remote black box. It can add a fixed service delay per request (to stand in for a slow
API) and inject faults on a schedule (to prove that retries never change the counts).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import orjson
import torch

from .adapters.local import PythonFunction, TorchModel

# A fault for request number i (counted from 0), or None to answer normally.
FaultPlan = Callable[[int], str | None]
FAULTS = ("503", "502", "500", "429", "429-retry-after", "drop", "reset", "stall", "malformed",
          "truncated", "wrong-count")  # fmt: skip


def random_faults(rate: float, seed: int, kinds: tuple[str, ...] = FAULTS) -> FaultPlan:
    """A fault for a fraction `rate` of requests, drawn from `kinds`; the same seed gives the
    same fault for the same request number, whatever the timing."""

    def plan(index: int) -> str | None:
        rng = np.random.default_rng([seed, index])
        return str(rng.choice(kinds)) if rng.random() < rate else None

    return plan


_DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8,
    "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
}  # fmt: skip


class InferenceServer:
    """Serves `model` as /v2/models/NAME on 127.0.0.1 in a background thread."""

    def __init__(
        self,
        model: TorchModel | PythonFunction,
        name: str = "model",
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        max_inflight: int = 64,
        faults: FaultPlan | None = None,
        stall: float = 2.0,
        record: bool = False,
    ) -> None:
        self.model = model
        self.stall = stall  # seconds a "stall" fault waits: set it past the client's timeout
        self.name = name
        self.delay = delay
        self.faults = faults
        self.requests = 0  # requests received, faulty ones included
        self.images = 0  # images in requests that were answered
        self.faults_injected = 0
        # with `record`, how often each request body was answered (by digest): for tests that
        # check nothing is asked twice; off by default, it grows with every request
        self.record = record
        self.answered: Counter[str] = Counter()
        self.connections = 0  # open now
        self.peak_connections = 0
        self._count_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._httpd = _Server((host, port), _handler_for(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]}:{self.port}/v2/models/{self.name}/infer"

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the protocol ------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": "bbsmooth",
            "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, -1, -1, -1]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
                {"name": "label", "datatype": "INT64", "shape": [-1]},
            ],
        }

    def infer(self, body: Any) -> dict[str, Any]:
        """The answer to one inference request; ValueError for a request we cannot read."""
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise ValueError("request needs an 'inputs' list")
        if len(body["inputs"]) != 1 or not isinstance(body["inputs"][0], dict):
            raise ValueError("request must have exactly one input tensor")
        tensor = body["inputs"][0]
        dtype = _DTYPES.get(str(tensor.get("datatype")))
        if dtype is None:
            raise ValueError(f"unsupported datatype {tensor.get('datatype')!r}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or len(shape) != 4:
            raise ValueError(f"input shape must be [N, C, H, W], got {shape!r}")
        arr = np.asarray(tensor.get("data"), dtype=dtype).reshape(shape)
        x = torch.from_numpy(arr.astype(np.float32))
        if dtype == np.uint8:
            x = x / 255.0
        answer = self.model.classify_sync(x)
        outputs = []
        if answer.scores is not None:
            outputs.append(
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": list(answer.scores.shape),
                    "data": np.ascontiguousarray(answer.scores.reshape(-1)),
                }
            )
        outputs.append(
            {
                "name": "label",
                "datatype": "INT64",
                "shape": [len(answer.labels)],
                "data": answer.labels,
            }
        )
        wanted = body.get("outputs")
        if isinstance(wanted, list) and wanted:
            names = {o.get("name") for o in wanted if isinstance(o, dict)}
            outputs = [o for o in outputs if o["name"] in names]
        return {"model_name": self.name, "outputs": outputs}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is routine (timeouts, retries); stay quiet about it.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(server: InferenceServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # else small answers wait on delayed ACKs (40 ms)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return None

        def setup(self) -> None:
            super().setup()
            with server._count_lock:
                server.connections += 1
                server.peak_connections = max(server.peak_connections, server.connections)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                with server._count_lock:
                    server.connections -= 1

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))

        def do_GET(self) -> None:
            if self.path in ("/v2/health/live", "/v2/health/ready"):
                self._json(200, {"live": True})
            elif self.path == f"/v2/models/{server.name}":
                self._json(200, server.metadata())
            elif self.path == f"/v2/models/{server.name}/ready":
                self._json(200, {"ready": True})
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            if self.path != f"/v2/models/{server.name}/infer":
                self._json(404, {"error": f"no model at {self.path}"})
                return
            with server._count_lock:
                index = server.requests
                server.requests += 1
            fault = server.faults(index) if server.faults else None
            if fault is not None:
                with server._count_lock:
                    server.faults_injected += 1
                self._fault(fault, raw)
                return
            with server._slots:
                if server.delay:
                    time.sleep(server.delay)
                try:
                    answer = server.infer(orjson.loads(raw))
                except (ValueError, TypeError, orjson.JSONDecodeError) as e:
                    self._json(400, {"error": str(e)})
                    return
                with server._count_lock:
                    server.images += int(answer["outputs"][-1]["shape"][0])
                    if server.record:
                        server.answered[hashlib.sha256(raw).hexdigest()] += 1
            self._json(200, answer)

        def _fault(self, fault: str, raw: bytes) -> None:
            if fault in ("503", "502", "500"):
                self._json(int(fault), {"error": "injected fault"})
            elif fault == "429":
                self._json(429, {"error": "slow down"})
            elif fault == "429-retry-after":
                self._send(429, b'{"error": "slow down"}', {"retry-after": "1"})
            elif fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            elif fault == "reset":  # RST instead of FIN: SO_LINGER with a zero timeout
                self.close_connection = True
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.connection.close()
            elif fault == "stall":  # answer, but only after the client has given up
                time.sleep(server.stall)
                self._json(200, server.infer(orjson.loads(raw)))
            elif fault == "malformed":
                self._send(200, b'{"outputs": [{"name": "probabilities", "data": [1, 2')
            elif fault == "truncated":
                # Promise more bytes than we send, then hang up.
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "1000")
                self.end_headers()
                self.wfile.write(b'{"outputs": [')
                self.close_connection = True
            elif fault == "wrong-count":
                answer = server.infer(orjson.loads(raw))
                for out in answer["outputs"]:
                    out["shape"][0] -= 1
                    width = len(out["data"]) // max(1, out["shape"][0] + 1)
                    out["data"] = out["data"][width:]
                self._json(200, answer)
            else:
                raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")

    return Handler


class ServerProcess:
    """`bbsmooth serve` in a process of its own (so that it does not share our GIL), on
    127.0.0.1; a context manager that yields once the server answers /v2/health/ready."""

    def __init__(
        self, endpoint: str, name: str, port: int = 0, delay: float = 0.0, timeout: float = 60.0
    ) -> None:
        self.endpoint, self.name, self.delay, self.timeout = endpoint, name, delay, timeout
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{self.name}/infer"

    def __enter__(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "blackbox_smooth", "serve", "--endpoint", self.endpoint]
        cmd += ["--name", self.name, "--port", str(self.port), "--delay", str(self.delay)]
        self.proc = subprocess.Popen([*cmd, "--device", "cpu"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bbsmooth serve exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=1
                ):
                    return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("bbsmooth serve did not become ready in time")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free, else any free port on 127.0.0.1."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")
