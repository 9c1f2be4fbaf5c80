"""Faults on the wire, for the tests and benchmarks: a loopback Open Inference Protocol server
that answers chosen requests with a fault instead (on a schedule, or at random with a seed), to
prove that retries never change the counts. It plugs into `InferenceServer.before_answer`."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import orjson

from blackbox_smooth.serve import InferenceServer

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


class FaultyServer(InferenceServer):
    """An `InferenceServer` answering request i with the fault `faults(i)` when it is not None
    (`faults=None`: a healthy server); a "stall" answers after `stall` seconds, so set it past
    the client's timeout."""

    def __init__(
        self, *args: Any, faults: FaultPlan | None = None, stall: float = 2.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.faults, self.stall = faults, stall
        self.faults_injected = 0
        self._faults_lock = threading.Lock()

    def before_answer(self, index: int, body: bytes, handler: BaseHTTPRequestHandler) -> bool:
        fault = self.faults(index) if self.faults else None
        if fault is None:
            return False
        with self._faults_lock:
            self.faults_injected += 1
        self._inject(fault, body, handler)
        return True

    def _inject(self, fault: str, body: bytes, handler: BaseHTTPRequestHandler) -> None:
        if fault in ("503", "502", "500"):
            _send(handler, int(fault), _dumps({"error": "injected fault"}))
        elif fault == "429":
            _send(handler, 429, _dumps({"error": "slow down"}))
        elif fault == "429-retry-after":
            _send(handler, 429, b'{"error": "slow down"}', {"retry-after": "1"})
        elif fault == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        elif fault == "reset":  # RST instead of FIN: SO_LINGER with a zero timeout
            handler.close_connection = True
            linger = struct.pack("ii", 1, 0)
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            handler.connection.close()
        elif fault == "stall":  # answer, but only after the client has given up
            time.sleep(self.stall)
            _send(handler, 200, _dumps(self.infer(orjson.loads(body))))
        elif fault == "malformed":
            _send(handler, 200, b'{"outputs": [{"name": "probabilities", "data": [1, 2')
        elif fault == "truncated":
            # Promise more bytes than we send, then hang up.
            handler.send_response(200)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", "1000")
            handler.end_headers()
            handler.wfile.write(b'{"outputs": [')
            handler.close_connection = True
        elif fault == "wrong-count":
            answer = self.infer(orjson.loads(body))
            for out in answer["outputs"]:
                out["shape"][0] -= 1
                width = len(out["data"]) // max(1, out["shape"][0] + 1)
                out["data"] = out["data"][width:]
            _send(handler, 200, _dumps(answer))
        else:
            raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def _send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    """A JSON answer, as the server writes its own."""
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)
