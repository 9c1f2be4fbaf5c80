"""`make demo`: the main job end to end on the embedded default.

1. train (once, cached in .demo/) a small CNN on scikit-learn's real handwritten digits,
   upsampled to 28×28 — the black box, never trained on noise;
2. serve it over the Open Inference Protocol on 127.0.0.1 with `bbsmooth serve`;
3. certify a handful of held-out digits over HTTP with `bbsmooth certify`, printing the table.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters.base import file_digest
from .data import load_digits, save_image

DEMO_DIR = Path(".demo")
MODEL_VERSION = 1


class DigitsCNN(nn.Module):
    """A small CNN for 1×28×28 digits: ~110k parameters, 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): a fixed 80/20 split of the 1,797 digits."""
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train_digits_model(out: Path, epochs: int = 12, seed: int = 0) -> Path:
    """Train the demo black box (clean images only) and save it as TorchScript; cached."""
    out.mkdir(parents=True, exist_ok=True)
    path, meta_path = out / "digits_cnn.pt", out / "digits_cnn.json"
    if meta_path.exists() and path.exists():
        cached = json.loads(meta_path.read_text())
        if cached.get("version") == MODEL_VERSION:
            return path
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    tmp = path.with_suffix(".pt.tmp")
    torch.jit.save(torch.jit.script(model), str(tmp))
    os.replace(tmp, path)
    meta_path.write_text(json.dumps({"version": MODEL_VERSION, "test_accuracy": acc}))
    return path


def plot_certified_accuracy(
    records: list[dict], truth: list[int], sigma: float, path: Path
) -> Path:
    """Certified accuracy against radius: the share of images labelled correctly and certified
    at a radius of at least r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = np.array(
        [r["radius"] if r["label"] == t else -1.0 for r, t in zip(records, truth, strict=True)]
    )
    grid = np.linspace(0, max(1.0, records[0]["max_radius"] * 1.1), 200)
    acc = [(radii >= g).mean() for g in grid]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(grid, acc, lw=2, label=f"σ = {sigma}, n = {records[0]['n']}")
    ax.axvline(records[0]["max_radius"], ls=":", c="gray", label="max radius for (n, α)")
    ax.set(xlabel="l2 radius (pixel scale [0,1], 28×28)", ylabel="certified accuracy")
    ax.set(ylim=(0, 1.05), title=f"{len(records)} held-out digits, black box over HTTP")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _port(preferred: int = 18080) -> int:
    """A fixed port when free, so that the endpoint URL (part of the black box's fingerprint,
    hence of every cache key) is the same from one demo run to the next."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise SystemExit("no free port on 127.0.0.1")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the demo server exited before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the demo server did not become ready in time")


def main(count: int = 8, sigma: float = 0.25, n: int = 10_000) -> None:
    start = time.perf_counter()
    print("1/3 the black box: a small CNN trained on clean 28×28 digits (cached in .demo/)")
    model_path = train_digits_model(DEMO_DIR)
    meta = json.loads((DEMO_DIR / "digits_cnn.json").read_text())
    print(f"    clean test accuracy {meta['test_accuracy']:.3f}")
    _, _, x_te, y_te = digits_split()
    images = DEMO_DIR / "digits"
    images.mkdir(exist_ok=True)
    files = []
    for i in range(count):
        f = images / f"digit{i:02d}_true{y_te[i]}.png"
        save_image(x_te[i], f)
        files.append(str(f))

    port = _port()
    # The model's digest in its name: a retrained model is another endpoint, never a cache hit.
    name = f"digits-{file_digest(str(model_path))[:8]}"
    print(f"2/3 serving it over the Open Inference Protocol at http://127.0.0.1:{port}")
    bbsmooth = [sys.executable, "-m", "blackbox_smooth"]
    server = subprocess.Popen(
        [*bbsmooth, "serve", "--endpoint", f"torch:{model_path}", "--name", name]
        + ["--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_ready(port, server)
        print(f"3/3 certifying {count} held-out digits over HTTP (σ={sigma}, n={n}, α=0.001)")
        cmd = [
            *bbsmooth,
            "certify",
            *files,
            "--endpoint",
            f"http://127.0.0.1:{port}/v2/models/{name}/infer",
            "--sigma",
            str(sigma),
            "--n",
            str(n),
            "--cache",
            str(DEMO_DIR / "cache"),
        ]
        print("    $ bbsmooth certify .demo/digits/*.png --endpoint … --sigma", sigma, flush=True)
        rc = subprocess.call(cmd)
        if rc == 0:  # the same run again, as JSON: every answer replays from the cache
            out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True)
            records = [json.loads(line) for line in out.stdout.splitlines()]
            truth = [int(Path(r["image"]).stem.split("true")[1]) for r in records]
            plot = plot_certified_accuracy(records, truth, sigma, DEMO_DIR / "certified.png")
            sent = sum(r["queries_sent"] for r in records)
            print(f"    plot: {plot} (drawn from a second run that sent {sent} queries)")
    finally:
        server.terminate()
        server.wait(timeout=10)
    if rc:
        raise SystemExit(rc)
    print(
        f"done in {time.perf_counter() - start:.0f}s. Labels are the smoothed classifier's; each "
        "radius is an l2 ball (in [0,1] pixel units, at 28×28) where the label cannot change, "
        "with probability ≥ 0.999. Run again: every answer replays from .demo/cache."
    )


if __name__ == "__main__":
    main()
