"""`bbsmooth proxy` against the same work done by `bbsmooth evaluate`, in one run on this
machine, every server a process of its own and the load generator too:

- throughput: distinct digits certified through the proxy by 16 concurrent clients, against
  `evaluate` in process on the same digits (images in flight alike), the upstream
  `bbsmooth serve --delay 0.1`, so that its latency, not the 2 cores, sets the pace
  (`proxy_ratio_vs_cli`, goal ≥ 0.9);
- cached certificates: one answered image asked again by 32 concurrent clients (p50 ≤ 5 ms,
  p99 ≤ 25 ms, ≥ 500 requests/s are the goals);
- coalescing: 50 identical concurrent requests for a new image, upstream queries ÷ one
  certification's (`coalesce_upstream_ratio`, goal 1.0);
- memory: 64 concurrent requests of distinct 224×224 images against a 224×224 upstream model
  (n0 = 20, n = 100, a deadline long enough that every one is answered on 2 cores), the
  proxy's peak RSS (`peak_rss_mib`, goal ≤ 1,000).

One table, then `RESULT …`. Run: make bench-proxy (python -m benchmarks.proxy)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from blackbox_smooth import jobs
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split, train_digits_model
from blackbox_smooth.options import (
    CertifyOptions,
    DatasetOptions,
    EndpointOptions,
    SmoothingOptions,
)
from blackbox_smooth.serve import free_port
from tests.harness import serving

SIGMA, N0, N = 0.25, 20, 200
BATCH, CONCURRENCY = 55, 64  # 5 requests per image; 16 images in flight (evaluate: 64 // 4)
CLIENTS = 16
BRIGHT = """
import numpy as np

def f(x):
    # a 224×224 "model": the label is the mean brightness's tenth
    return np.clip((x.reshape(len(x), -1).mean(axis=1) * 10).astype(np.int64), 0, 9)
"""


def command(*args: object) -> list[str]:
    return [sys.executable, "-m", "blackbox_smooth", *map(str, args)]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _post_all(url: str, bodies: list[bytes], clients: int) -> list[float]:
    """Each body POSTed once, `clients` at a time; the latency of each, in seconds."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    times: list[float] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                r = await client.post(url, content=body, headers={"content-type": "image/png"})
                times.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(clients)))
    return times


def load(url: str, folder: Path, clients: int, repeat: int) -> dict[str, float]:
    """The load generator's side (run in its own process by --load)."""
    bodies = [p.read_bytes() for p in sorted(folder.glob("*.png"))] * repeat
    start = time.perf_counter()
    times = asyncio.run(_post_all(url, bodies, clients))
    wall = time.perf_counter() - start
    ordered = sorted(times)
    return {
        "requests": len(times),
        "per_second": len(times) / wall,
        "p50_ms": 1e3 * ordered[len(ordered) // 2],
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "wall": wall,
    }


def run_load(url: str, folder: Path, clients: int, repeat: int = 1) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.proxy", "--load", url, "--folder", str(folder),
         "--clients", str(clients), "--repeat", str(repeat)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--load")
    parser.add_argument("--folder")
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.load, Path(args.folder), args.clients, args.repeat)))
        return
    rows: list[tuple[str, str]] = []
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = train_digits_model(root / "model", epochs=4)
        _, _, x, y = digits_split()
        digits = root / "digits"
        for i in range(args.images):
            (digits / str(y[i])).mkdir(parents=True, exist_ok=True)
            save_image(x[i], digits / str(y[i]) / f"{i:03d}.png")
        flat = root / "flat"
        flat.mkdir()
        for p in digits.glob("*/*.png"):
            (flat / p.name).write_bytes(p.read_bytes())
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}/v2/models/digits/infer"
        serve = command("serve", "-e", f"torch:{model}", "--name", "digits", "--port", up_port,
                        "--delay", "0.1")  # fmt: skip
        wire = ["--batch", BATCH, "--concurrency", CONCURRENCY]
        common = ["--sigma", SIGMA, "--n0", N0, "--n", N, "--size", "28x28", "--grayscale"]
        with serving(serve, f"http://127.0.0.1:{up_port}/v2/health/ready", root / "up.log"):
            # evaluate in process: the baseline
            wired = EndpointOptions(batch=BATCH, concurrency=CONCURRENCY)
            options = SmoothingOptions(endpoint=upstream, sigma=SIGMA, no_cache=True, wire=wired)
            start = time.perf_counter()
            jobs.evaluate(options, DatasetOptions(data=digits), root / "eval",
                          CertifyOptions(n0=N0, n=N))  # fmt: skip
            cli_rate = args.images / (time.perf_counter() - start)
            # the proxy, no cache: every certification is paid for
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proxy = command("proxy", "-e", upstream, *common, *wire, "--port", port,
                            "--no-cache", "--max-bodies", 64)  # fmt: skip
            with serving(proxy, f"{base}/readyz", root / "proxy.log"):
                through = run_load(f"{base}/v1/certify", flat, CLIENTS)
            ratio = through["per_second"] / cli_rate
            rows += [
                (f"evaluate in process, {args.images} digits (n0={N0}, n={N})",
                 f"{cli_rate:.2f} certificates/s"),
                (f"proxy, {CLIENTS} concurrent clients, the same digits",
                 f"{through['per_second']:.2f} certificates/s"),
                ("  proxy_ratio_vs_cli (goal ≥ 0.9)", f"{ratio:.2f}"),
            ]  # fmt: skip
            result["proxy_ratio_vs_cli"] = ratio
            # a cached proxy: one image answered, then asked again and again
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cached = command("proxy", "-e", upstream, *common, *wire, "--port", port,
                             "--cache", root / "cache", "--max-bodies", 64)  # fmt: skip
            one = root / "one"
            one.mkdir()
            first = sorted(flat.glob("*.png"))[0]
            (one / first.name).write_bytes(first.read_bytes())
            with serving(cached, f"{base}/readyz", root / "cached.log"):
                run_load(f"{base}/v1/certify", one, 1)  # answered once: now in the cache
                hot = run_load(f"{base}/v1/certify", one, 32, repeat=2000)
                # coalescing: 50 identical requests for an image never asked
                fresh = root / "fresh"
                fresh.mkdir()
                other = sorted(flat.glob("*.png"))[1]
                for k in range(50):
                    (fresh / f"{k:02d}.png").write_bytes(other.read_bytes())
                before = _sent(base)
                run_load(f"{base}/v1/certify", fresh, 50)
                coalesce = (_sent(base) - before) / (N0 + N)
            rows += [
                ("cached certificate, 32 concurrent clients: p50", f"{hot['p50_ms']:.1f} ms"),
                ("  p99", f"{hot['p99_ms']:.1f} ms"),
                ("  requests/s", f"{hot['per_second']:.0f}"),
                ("50 identical concurrent requests: upstream ÷ one certification",
                 f"{coalesce:.2f}"),
            ]  # fmt: skip
            result.update(cached_p50_ms=hot["p50_ms"], cached_p99_ms=hot["p99_ms"],
                          cached_per_second=hot["per_second"],
                          coalesce_upstream_ratio=coalesce)  # fmt: skip
        rss, errors = _memory(root)
        rows.append(("64 concurrent 224×224 requests: the proxy's peak RSS", f"{rss:.0f} MiB"))
        rows.append(("  errors", str(errors)))
        result.update(peak_rss_mib=rss, errors=errors)
    width = max(len(name) for name, _ in rows)
    print(f"{'figure'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))


def _sent(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith('bbsmooth_upstream_queries_total{kind="sent"}'):
            return float(line.split()[-1])
    return 0.0


def _memory(root: Path) -> tuple[float, int]:
    """64 distinct 224×224 images at once through the proxy to a 224×224 upstream."""
    (root / "bright.py").write_text(BRIGHT)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(64):
        save_image(rng.random((3, 224, 224), dtype=np.float32), photos / f"{k:02d}.png")
    up_port, port = free_port(), free_port()
    serve = command("serve", "-e", f"python:{root / 'bright.py'}:f", "--name", "bright",
                    "--port", up_port)  # fmt: skip
    proxy = command(
        "proxy",
        "-e",
        f"http://127.0.0.1:{up_port}/v2/models/bright/infer",
        "--sigma",
        SIGMA,
        "--n0",
        N0,
        "--n",
        100,
        "--size",
        "224x224",
        "--port",
        port,
        "--no-cache",
        "--max-bodies",
        64,
        "--batch",
        32,
        "--deadline",
        1800,
    )  # fmt: skip  (2 cores: every answer, however late)
    base = f"http://127.0.0.1:{port}"
    errors = 0
    with (
        serving(serve, f"http://127.0.0.1:{up_port}/v2/health/ready", root / "b.log"),
        serving(proxy, f"{base}/healthz", root / "p.log") as proc,
    ):
        try:
            run_load(f"{base}/v1/certify", photos, 64)
        except subprocess.CalledProcessError:
            errors += 1
        rss = peak_rss_mib(proc.pid)
    return rss, errors


if __name__ == "__main__":
    main()
