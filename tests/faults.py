"""Faults on the wire, for the tests and benchmarks: a loopback Open Inference Protocol server
that answers chosen requests with a fault instead (on a schedule, or at random with a seed), to
prove that retries never change the counts. It plugs into `InferenceServer.before_answer`."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from blackbox_smooth.serve import InferenceServer, json_response

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

    async def before_answer(self, index: int, body: bytes, request: Request) -> Response | None:
        fault = self.faults(index) if self.faults else None
        if fault is None:
            return None
        with self._faults_lock:
            self.faults_injected += 1
        return await self._inject(fault, body)

    async def _inject(self, fault: str, body: bytes) -> Response:
        if fault in ("503", "502", "500"):
            return json_response(int(fault), {"error": "injected fault"})
        if fault == "429":
            return json_response(429, {"error": "slow down"})
        if fault == "429-retry-after":
            return json_response(429, {"error": "slow down"}, {"retry-after": "1"})
        if fault in ("drop", "reset"):
            return _Hangup(reset=fault == "reset")
        if fault == "stall":  # answer, but only after the client has given up
            await asyncio.sleep(self.stall)
            return json_response(200, self.infer(orjson.loads(body)))
        if fault == "malformed":
            return Response(b'{"outputs": [{"name": "probabilities", "data": [1, 2', 200,
                            media_type="application/json")  # fmt: skip
        if fault == "truncated":  # promise more bytes than are sent, then hang up
            return _Hangup(partial=b'{"outputs": [')
        if fault == "wrong-count":
            answer = self.infer(orjson.loads(body))
            for out in answer["outputs"]:
                out["shape"][0] -= 1
                width = len(out["data"]) // max(1, out["shape"][0] + 1)
                out["data"] = out["data"][width:]
            return json_response(200, answer)
        raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")


class _Hangup(Response):
    """A connection closed instead of an answer: after nothing (a FIN, or with `reset` an RST:
    SO_LINGER with a zero timeout), or after a head that promises 1,000 bytes and `partial`.
    The socket is reached through the transport the server's protocol puts in the scope (a
    fault no well-behaved server can be made to produce)."""

    def __init__(self, reset: bool = False, partial: bytes | None = None) -> None:
        super().__init__()
        self.reset, self.partial = reset, partial

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        transport = scope["extensions"]["bbsmooth.transport"]
        if self.partial is not None:
            headers = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.partial, "more_body": True})
        if self.reset:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.abort() if self.partial is None else transport.close()
        while (await receive())["type"] != "http.disconnect":  # until the server has seen it
            pass
