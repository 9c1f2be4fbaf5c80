"""A small Open Inference Protocol (KServe V2) server for a local classifier, on uvicorn.

`bbsmooth serve --endpoint torch:model.pt --name digits` puts a model file behind the same
HTTP protocol Triton, MLServer and KServe speak; the demo, the tests and the benchmarks query it
like any remote black box. It can add a fixed service delay per request (to stand in for a slow
API); a subclass may answer a request itself through `InferenceServer.before_answer` (the tests
inject faults that way, tests/faults.py).

It stands on the same bounded HTTP edge as `bbsmooth proxy` (httpserver.py): a hostile or
broken client gets one JSON line and its status, never a traceback or a dropped connection.
Bodies are capped (413, unread) and must say their length (411); each must arrive within
--client-timeout (408); at most `max_bodies` are read and parsed at once (memory follows
them, not the number of clients); every tensor is checked (tensors.py: 400); with an API key
every request but the health probes needs `Authorization: Bearer KEY` (401).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import numpy as np
import orjson
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .adapters.local import PythonFunction, TorchModel
from .blackbox import labels_out
from .errors import UsageError
from .httpserver import (
    ClientKeys,
    HttpServer,
    Refused,
    error_handlers,
    error_response,
    guarded,
    holding,
    read_body,
)
from .tensors import DATATYPES, images_of

HEALTH = ("/v2/health/live", "/v2/health/ready")  # open without the key: for probes
OUTPUTS = ("probabilities", "label")


def json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status, headers, media_type="application/json")


class InferenceServer:
    """Serves `model` as /v2/models/NAME on 127.0.0.1 in a background thread (`start`, or as
    a context manager), or in the foreground (`serve_forever`, the CLI).

    Limits against hostile clients: a body over `max_request_bytes` is refused unread (413);
    a request must arrive within `client_timeout` seconds (its head, then its body); at most
    `max_bodies` bodies are read, parsed and answered at once (the others wait for a slot, up
    to `client_timeout`); past `max_connections` the longest-idle connection is closed to
    admit a new one (503 only when all are busy); with `api_key`, every request but the health
    probes needs `Authorization: Bearer API_KEY` (401)."""

    def __init__(
        self,
        model: TorchModel | PythonFunction,
        name: str = "model",
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        max_inflight: int = 64,
        record: bool = False,
        max_request_bytes: int = 64 * 2**20,
        client_timeout: float = 30.0,
        max_connections: int = 256,
        api_key: str | None = None,
        max_bodies: int = 2,
    ) -> None:
        if min(max_request_bytes, max_connections, max_bodies, max_inflight) < 1:
            raise ValueError("max_request_bytes, max_connections, max_bodies must be ≥ 1")
        if not client_timeout > 0:
            raise ValueError("client_timeout must be > 0")
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty (None: no key)")
        self.model = model
        self.name = name
        self.delay = delay
        self.requests = 0  # inference requests received, those `before_answer` took included
        self.images = 0  # images in requests the model answered
        # with `record`, how often each request body was answered (by digest): for tests that
        # check nothing is asked twice; off by default, it grows with every request
        self.record = record
        self.answered: Counter[str] = Counter()
        self.max_request_bytes = max_request_bytes
        self.client_timeout = client_timeout
        self.max_inflight, self.max_bodies = max_inflight, max_bodies
        self._keys = ClientKeys([] if api_key is None else [api_key])
        self._count_lock = threading.Lock()  # counters are updated from worker threads
        self.http = HttpServer(
            guarded(self.asgi(), _log),
            host,
            port,
            client_timeout=client_timeout,
            max_connections=max_connections,
        )

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"{self.http.url}/v2/models/{self.name}/infer"

    # connections: open now, the most at once, refused (503 when every one was busy)
    @property
    def connections(self) -> int:
        return self.http.connections.open

    @property
    def peak_connections(self) -> int:
        return self.http.connections.peak

    @peak_connections.setter
    def peak_connections(self, value: int) -> None:
        self.http.connections.peak = value

    @property
    def refused_connections(self) -> int:
        return self.http.connections.refused

    def start(self) -> InferenceServer:
        self.http.start()
        return self

    def serve_forever(self) -> None:
        self.http.run()

    def stop(self) -> None:
        self.http.stop()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def before_answer(self, index: int, body: bytes, request: Request) -> Response | None:
        """Called with each inference request (`index` counts them from 0) before the model
        sees it; a response to send instead, or None. A hook for subclasses (tests/faults.py);
        by default every request goes on."""
        return None

    # -- the protocol ------------------------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"name": "bbsmooth", "version": version("blackbox_smooth"), "extensions": []}

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
        """The answer to one inference request; UsageError for a request we cannot read."""
        values = self.max_request_bytes // 2  # a value takes at least two bytes of JSON
        arr = images_of(
            body, 2**31, values, None, outputs=OUTPUTS, datatypes=tuple(DATATYPES),
            unit_range=False,
        )  # fmt: skip
        answer = self.model.classify_sync(torch.from_numpy(arr))
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
                "data": labels_out(answer.labels),  # OTHER as -1, as clients read it
            }
        )
        wanted = body.get("outputs")
        if isinstance(wanted, list) and wanted:
            names = {o.get("name") if isinstance(o, dict) else o for o in wanted}
            outputs = [o for o in outputs if o["name"] in names]
        return {"model_name": self.name, "outputs": outputs}

    # -- HTTP ------------------------------------------------------------------------------

    def asgi(self) -> Starlette:
        """The app: the protocol's routes, each refusal one JSON line."""
        inflight = asyncio.Semaphore(self.max_inflight)
        bodies = asyncio.Semaphore(self.max_bodies)

        def admitted(request: Request) -> None:
            if request.url.path not in HEALTH:
                self._keys.name_of(request.headers)

        def model_named(name: str) -> None:
            if name != self.name:
                raise Refused(404, f"no model {name[:60]!r}: this server has {self.name!r}")

        async def server(request: Request) -> Response:
            admitted(request)
            return json_response(200, self.server_metadata())

        async def live(request: Request) -> Response:
            return json_response(200, {"live": True})

        async def ready(request: Request) -> Response:
            return json_response(200, {"ready": True})

        async def model(request: Request) -> Response:
            admitted(request)
            model_named(request.path_params["name"])
            return json_response(200, self.metadata())

        async def model_ready(request: Request) -> Response:
            admitted(request)
            model_named(request.path_params["name"])
            return json_response(200, {"name": self.name, "ready": True})

        async def infer(request: Request) -> Response:
            admitted(request)
            model_named(request.path_params["name"])
            async with inflight:
                if self.delay:
                    await asyncio.sleep(self.delay)
                async with holding(bodies, wait=self.client_timeout):
                    raw = await read_body(
                        request, self.max_request_bytes, self.client_timeout, length_required=True
                    )
                    with self._count_lock:
                        index = self.requests
                        self.requests += 1
                    instead = await self.before_answer(index, raw, request)
                    if instead is not None:
                        return instead
                    return await asyncio.to_thread(self._answer, raw)

        routes = [
            Route("/v2", server),
            Route("/v2/health/live", live),
            Route("/v2/health/ready", ready),
            Route("/v2/models/{name}", model),
            Route("/v2/models/{name}/ready", model_ready),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        ]

        return Starlette(routes=routes, exception_handlers=error_handlers("server"))

    def _answer(self, raw: bytes) -> Response:
        """Parse, check, classify, encode: in a worker thread, off the event loop."""
        try:
            answer = self.infer(orjson.loads(raw))
        except orjson.JSONDecodeError:
            return error_response(400, "the body is not JSON")
        except (UsageError, ValueError, TypeError) as e:
            return error_response(400, str(e))
        except RuntimeError as e:  # the model refused the tensor (a shape it cannot take)
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return error_response(400, f"the model could not take this input: {line}")
        with self._count_lock:
            self.images += int(answer["outputs"][-1]["shape"][0])
            if self.record:
                self.answered[hashlib.sha256(raw).hexdigest()] += 1
        return json_response(200, answer)


def _log(message: str) -> None:
    print(f"bbsmooth serve: {message}", file=sys.stderr, flush=True)


class ServerProcess:
    """`bbsmooth serve` in a process of its own (so that it does not share our GIL), on
    127.0.0.1; a context manager that yields once the server answers /v2/health/ready."""

    def __init__(
        self,
        endpoint: str,
        name: str,
        port: int = 0,
        delay: float = 0.0,
        timeout: float = 60.0,
        extra: tuple[str, ...] = (),  # more `bbsmooth serve` flags
    ) -> None:
        self.endpoint, self.name, self.delay, self.timeout = endpoint, name, delay, timeout
        self.extra = extra
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{self.name}/infer"

    def __enter__(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "blackbox_smooth", "serve", "--endpoint", self.endpoint]
        cmd += ["--name", self.name, "--port", str(self.port), "--delay", str(self.delay)]
        cmd += ["--device", "cpu", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
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
