"""A small Open Inference Protocol (KServe V2) server for a local classifier, on loopback.

`bbsmooth serve --endpoint torch:model.pt --name digits` puts a model file behind the same
HTTP protocol Triton, MLServer and KServe speak; the demo, the tests and the benchmarks query it
like any remote black box. It can add a fixed service delay per request (to stand in for a slow
API); a subclass may answer a request itself through `InferenceServer.before_answer` (the tests
inject faults that way, tests/faults.py).

A hostile or broken client gets a short JSON error and a closed connection, never a traceback:
bodies are capped (413) and read in pieces, Content-Length must be plain digits (400, 411
without one), every read has a timeout and every request a deadline (a trickle cannot hold a
thread), connections are capped (503 beyond), and with an API key every request but the health
probes needs `Authorization: Bearer KEY` (401).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import orjson
import torch

from .adapters.http import is_loopback as address_is_loopback
from .adapters.local import PythonFunction, TorchModel

_DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8,
    "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
}  # fmt: skip


HEALTH = ("/v2/health/live", "/v2/health/ready")  # open without the key: for probes
_CHUNK = 1 << 20  # a body is read this much at a time: memory follows what arrives
# The answer to a connection past `max_connections`, sent from the accepting thread.
_BUSY_BODY = b'{"error": "too many connections: try again later"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is on this machine only ("" means all interfaces);
    OSError (or UnicodeError, ValueError) when it names none."""
    host = host.strip("[]")
    if not host:
        return False
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return all(address_is_loopback(str(info[4][0])) for info in infos)


class InferenceServer:
    """Serves `model` as /v2/models/NAME on 127.0.0.1 in a background thread.

    Limits against hostile clients: a body over `max_request_bytes` is refused unread (413);
    each socket read stalls at most `client_timeout` seconds and a whole request (headers and
    body) must arrive within `client_timeout` of its first byte; at most `max_connections` are
    served at once (503 beyond); with `api_key`, every request but the health probes needs
    `Authorization: Bearer API_KEY` (401)."""

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
    ) -> None:
        if max_request_bytes < 1 or max_connections < 1 or not client_timeout > 0:
            raise ValueError("max_request_bytes, max_connections and client_timeout must be > 0")
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
        self.connections = 0  # open now
        self.peak_connections = 0
        self.refused_connections = 0  # past max_connections, answered 503
        self.max_request_bytes = max_request_bytes
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self._api_key = None if api_key is None else api_key.encode()
        self._count_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._connection_slots = threading.BoundedSemaphore(max_connections)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = _Server(self, (host.strip("[]"), port), _handler_for(self), family)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v2/models/{self.name}/infer"

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

    def before_answer(self, index: int, body: bytes, handler: BaseHTTPRequestHandler) -> bool:
        """Called with each inference request (`index` counts them from 0) before the model
        sees it; True when it was answered here (or the connection dropped): it gets no other
        answer. A hook for subclasses (tests/faults.py); by default every request goes on."""
        return False

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

    def __init__(
        self,
        owner: InferenceServer,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        family: socket.AddressFamily,
    ) -> None:
        self.owner = owner
        self.address_family = family
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread per connection: past the cap, answer 503 from here and start none.
        owner = self.owner
        if not owner._connection_slots.acquire(blocking=False):
            with owner._count_lock:
                owner.refused_connections += 1
            try:
                request.setblocking(False)  # never wait on this client in the accepting thread
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with owner._count_lock:
            owner.connections += 1
            owner.peak_connections = max(owner.peak_connections, owner.connections)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back here
            self._closed()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self) -> None:
        # The slot first: once `connections` reads 0, a new connection is served.
        self.owner._connection_slots.release()
        with self.owner._count_lock:
            self.owner.connections -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up, stalls or resets is routine (timeouts, retries, hostile
        # clients); stay quiet about it. Anything else is our bug: print it.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _DeadlineIO(socket.SocketIO):
    """Socket reads that each stall at most `timeout` seconds and, once a request's first byte
    has arrived, end by its deadline (`timeout` later): a byte a second cannot hold a thread."""

    _sock: socket.socket  # SocketIO's, undeclared in typeshed

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__(sock, "rb")
        self.timeout = timeout
        self.deadline: float | None = None  # None: waiting for a request's first byte

    def readinto(self, b: Any) -> int | None:
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("request not received in time")
        self._sock.settimeout(wait)
        try:
            n = super().readinto(b)
        finally:
            self._sock.settimeout(self.timeout)  # writes keep the full timeout
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        return n


LINGER_SECONDS, LINGER_BYTES = 2.0, 256 * 2**20


def _linger(conn: socket.socket) -> None:
    """After refusing a request whose body was left unread: stop writing, then read and drop
    what the client is still sending, for a bounded time and size, before closing. Closing at
    once would reset the connection, and the reset can destroy the answer before the client
    reads it: the client would see a dropped connection instead of the refusal."""
    try:
        conn.shutdown(socket.SHUT_WR)
        end, dropped = time.monotonic() + LINGER_SECONDS, 0
        while dropped < LINGER_BYTES and (left := end - time.monotonic()) > 0:
            conn.settimeout(left)
            piece = conn.recv(1 << 16)
            if not piece:
                break
            dropped += len(piece)
    except OSError:
        pass


def _handler_for(server: InferenceServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # else small answers wait on delayed ACKs (40 ms)
        timeout = server.client_timeout  # set on each socket: a silent client is dropped

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return None

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # replaced by one that keeps each request's deadline
            self._io = _DeadlineIO(self.connection, server.client_timeout)
            self.rfile = io.BufferedReader(self._io)
            self._body_unread = False  # set when a request is refused before its body is read

        def handle_one_request(self) -> None:
            self._io.deadline = None  # the clock starts at the next request's first byte
            super().handle_one_request()

        def _send(
            self,
            status: int,
            body: bytes,
            headers: dict[str, str] | None = None,
            close: bool = False,
        ) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if close:  # also sets close_connection: an unread body must not be parsed
                self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any, close: bool = False) -> None:
            self._send(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), close=close)

        def _refuse(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
            self._send(status, orjson.dumps({"error": error}), headers, close=True)
            self._body_unread = True

        def finish(self) -> None:
            super().finish()
            if self._body_unread:
                _linger(self.connection)

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            # http.server's own errors (bad request line, headers too long, unknown method):
            # JSON like ours, and the connection closed; with a status line even when the
            # request line was too garbled to name a version (else HTTP/0.9: body only).
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            self._refuse(code, message or self.responses.get(code, ("error",))[0])

        def handle_expect_100(self) -> bool:
            # Refuse an oversized or unauthorized body before the client sends it.
            if self._admit(body=self.command == "POST") is None:
                return False
            return super().handle_expect_100()

        def _admit(self, body: bool) -> int | None:
            """The body's length if the request may go on; else None, once it is answered (and
            the connection closed, the body unread)."""
            if self.headers.get_all("transfer-encoding"):
                self._refuse(411, "chunked bodies are not supported: send Content-Length")
                return None
            values = self.headers.get_all("content-length") or []
            if len(values) > 1:
                self._refuse(400, "more than one Content-Length header")
                return None
            length = 0
            if values:
                # Plain digits only: int() would take "-1", "+5", " 1_0" and "١٢".
                value = values[0].strip(" \t")
                if not (value.isascii() and value.isdigit()):
                    self._refuse(400, "Content-Length must be a non-negative decimal integer")
                    return None
                digits = value.lstrip("0") or "0"
                limit = server.max_request_bytes
                if len(digits) > 18 or int(digits) > limit:
                    self._refuse(413, f"request body over the limit of {limit} bytes")
                    return None
                length = int(digits)
            elif body:
                self._refuse(411, f"{self.command} needs a Content-Length header")
                return None
            if self.path not in HEALTH and not self._authorized():
                # Never echo what the client sent: it may be a near-miss of the key.
                self._refuse(401, "missing or wrong API key", {"www-authenticate": "Bearer"})
                return None
            return length

        def _authorized(self) -> bool:
            if server._api_key is None:
                return True
            values = self.headers.get_all("authorization") or []
            if len(values) != 1:
                return False
            scheme, _, token = values[0].strip().partition(" ")
            # Headers arrive decoded as Latin-1: encoding back gives the bytes that were sent.
            sent = token.strip().encode("latin-1", "replace")
            return scheme.lower() == "bearer" and hmac.compare_digest(sent, server._api_key)

        def _body(self, length: int) -> bytes | None:
            """The body, read in pieces; None (connection closed) if the client left early."""
            chunks = []
            while length:
                chunk = self.rfile.read(min(length, _CHUNK))
                if not chunk:
                    self.close_connection = True
                    return None
                chunks.append(chunk)
                length -= len(chunk)
            return b"".join(chunks)

        def do_GET(self) -> None:
            length = self._admit(body=False)
            if length is None or self._body(length) is None:  # a GET body is read and dropped
                return
            if self.path in HEALTH:
                self._json(200, {"live": True})
            elif self.path == f"/v2/models/{server.name}":
                self._json(200, server.metadata())
            elif self.path == f"/v2/models/{server.name}/ready":
                self._json(200, {"ready": True})
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            length = self._admit(body=True)
            raw = None if length is None else self._body(length)
            if raw is None:
                return
            if self.path != f"/v2/models/{server.name}/infer":
                self._json(404, {"error": f"no model at {self.path}"})
                return
            with server._count_lock:
                index = server.requests
                server.requests += 1
            if server.before_answer(index, raw, self):
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

    return Handler


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
