"""A hostile server: one mode per way a server can try to hurt its client, on loopback
(`HostileServer`) or in process (`hostile_transport`, all but the slow modes).

The first path segment picks the mode (`http://127.0.0.1:PORT/MODE/...`), so one server serves
the whole corpus; the rest of the path is what the adapter expects (`/v2/models/m/infer` for the
Open Inference Protocol, anything for the file-taking vendors). Every mode that can echo the key
echoes the one the client sent (from Authorization, or `?key=`), so a leak is the real key.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\u202e"  # set the title, clear the screen, red, bidi


def _key(target: str, headers: Mapping[str, str]) -> str:
    auth = headers.get("authorization") or ""
    query = parse_qs(urlsplit(target).query)
    return auth.removeprefix("Bearer ").strip() or query.get("key", [""])[0]


def _padded(key: str, offset: int) -> str:
    """The key placed so that it starts `offset` characters into the text."""
    return "x" * offset + key + " is not valid"


def _bomb(total: int) -> Iterator[bytes]:
    """`total` zero bytes, gzip-compressed on the fly (about 1,000:1)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    for _ in range(total >> 20):
        out = packer.compress(block)
        if out:
            yield out
    yield packer.flush()


Reply = tuple[int, dict[str, str], bytes | Iterator[bytes]]


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"content-type": "application/json", **(headers or {})}, json.dumps(obj).encode()


def _oip(labels: list[Any]) -> Reply:
    return _json(200, {"outputs": [{"name": "label", "datatype": "INT64",
                                    "shape": [len(labels)], "data": labels}]})  # fmt: skip


def _batch(body: bytes) -> int:
    """Images in an Open Inference Protocol request."""
    try:
        return int(json.loads(body)["inputs"][0]["shape"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return 1


# mode → (request body, key) → reply; the slow ones are handled in the handler itself
MODES: dict[str, Callable[[bytes, str], Reply]] = {
    # the key comes back
    "key-as-label": lambda b, k: _json(200, [{"label": k, "score": 0.9}]),
    "key-in-label-object": lambda b, k: _json(200, [{"label": {"k": k}, "score": 0.9}]),
    "key-at-offset-150": lambda b, k: _json(400, {"error": _padded(k, 150)}),
    "key-at-offset-195": lambda b, k: _json(400, {"error": _padded(k, 195)}),
    "key-at-offset-199": lambda b, k: _json(400, {"error": _padded(k, 199)}),
    "key-percent-encoded": lambda b, k: (400, {}, f"bad key {k.replace('-', '%2D')}".encode()),
    "key-json-escaped": lambda b, k: (400, {}, json.dumps({"e": k.replace("/", "\\/")}).encode()),
    "key-uppercased": lambda b, k: (403, {}, f"denied: {k.upper()}".encode()),
    "key-in-gcv-error": lambda b, k: _json(
        200,
        {
            "responses": [{"error": {"code": 3, "message": _padded(k, 190)}}]
            * len(json.loads(b)["requests"])
        },
    ),
    "key-in-redirect": lambda b, k: (307, {"location": f"/moved/{k}/v2?token={k}"}, b"{}"),
    "key-in-datatype": lambda b, k: _json(
        200, {"outputs": [{"name": "o", "datatype": k, "shape": [1], "data": [1]}]}
    ),
    # redirects
    "redirect-with-answer": lambda b, k: (
        307,
        {"location": "http://127.0.0.1:9/elsewhere", "content-type": "application/json"},
        _oip([1] * _batch(b))[2],
    ),
    "redirect-empty": lambda b, k: (302, {"location": "https://other.example/infer?sig=x"}, b""),
    # what a server can make us hold
    "huge-declared": lambda b, k: (200, {"content-length": str(2_000_000_000)}, b"{"),
    "endless-chunked": lambda b, k: (200, {}, iter(lambda: b" " * 65536, None)),
    "gzip-bomb": lambda b, k: (200, {"content-encoding": "gzip"}, _bomb(600 << 20)),
    "three-million-labels": lambda b, k: (
        200,
        {},
        (b"[" + b'{"label":"a","score":0.5},' * 100_000 for _ in range(30)),
    ),
    "many-labels": lambda b, k: _json(200, [{"label": "3", "score": 0.1}] * 20_000),
    "brotli": lambda b, k: (200, {"content-encoding": "br"}, b"\x0b\x01\x80[]\x03"),
    "deep-json": lambda b, k: (200, {}, b"[" * 100_000 + b"]" * 100_000),
    # what a server can make us believe
    "huge-label-string": lambda b, k: _json(
        200, [{"label": "99999999999999999999999", "score": 0.9}]
    ),
    "huge-class-index": lambda b, k: _oip([1e23] * _batch(b)),
    "twenty-megabyte-label": lambda b, k: _json(200, [{"label": "A" * (20 << 20), "score": 1}]),
    "escapes-in-error": lambda b, k: _json(400, {"error": ESCAPES + "nope"}),
    "escapes-in-label": lambda b, k: _json(200, [{"label": ESCAPES + "cat", "score": 1}]),
    "not-json": lambda b, k: (200, {}, b"<html>hello</html>"),
    "unauthorized": lambda b, k: _json(401, {"error": "Invalid credentials"}),
    "good": lambda b, k: _json(200, [{"label": "3", "score": 0.9}, {"label": "5", "score": 0.1}]),
    "retry-after-a-year": lambda b, k: _json(429, {"error": "later"}, {"retry-after": "31536000"}),
}
SLOW = ("slow-body", "slow-headers")


def answer(target: str, headers: Mapping[str, str], body: bytes) -> Reply:
    """The reply of the mode that `target` (path and query) names; not for the SLOW modes."""
    mode = urlsplit(target).path.split("/")[1]
    if mode == "header-as-label":  # what a vendor config's fixed headers sent
        return _json(200, [{"label": headers.get("x-version", "none"), "score": 1.0}])
    return MODES[mode](body, _key(target, headers))


def hostile_transport() -> httpx.MockTransport:
    """Every mode but the SLOW ones in process (an httpx transport for `open_blackbox`): what
    the client parses and how much it holds are the point there, not the socket."""

    async def handle(request: httpx.Request) -> httpx.Response:
        status, headers, content = answer(
            request.url.raw_path.decode(), request.headers, await request.aread()
        )
        if isinstance(content, bytes):
            return httpx.Response(status, headers=headers, content=content)
        return httpx.Response(status, headers=headers, content=_streamed(content))

    return httpx.MockTransport(handle)


async def _streamed(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:  # made lazily: the client stops reading at its bound
        yield chunk


class HostileServer:
    """All MODES on 127.0.0.1, in a background thread."""

    def __init__(self) -> None:
        self.requests = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, mode: str, path: str = "/infer") -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/{mode}{path}"

    def __enter__(self) -> HostileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: HostileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            server.requests += 1
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            mode = urlsplit(self.path).path.split("/")[1]
            try:
                if mode in SLOW:
                    self._slow(mode)
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                self._reply(*answer(self.path, headers, body))
            except (ConnectionError, TimeoutError):
                return  # the client gave up, as it should

        def _reply(self, status: int, headers: dict[str, str], content: Any) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if isinstance(content, bytes):
                if "content-length" not in headers:
                    self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)
                return
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for chunk in content:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def _slow(self, mode: str) -> None:
            """One byte every 0.5 s, headers or body: each read is quick, the whole is not."""
            self.close_connection = True
            answer = b'[{"label": "3", "score": 0.9}]'
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(answer)}\r\n\r\n".encode()
            if mode == "slow-body":
                self.wfile.write(head)
                head, answer = b"", answer
            else:
                head, answer = head + answer, b""
            for i in range(len(head + answer)):
                self.wfile.write((head + answer)[i : i + 1])
                self.wfile.flush()
                time.sleep(0.5)

    return Handler
