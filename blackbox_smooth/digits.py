"""The embedded default: scikit-learn's handwritten digits at 28×28, the held-out split, and the
small CNN the demo serves as its black box (trained on clean images only, never on noise)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_digits

MODEL_VERSION = 2
TRAIN = 1297  # of the 1,797 digits; the last 500 are held out


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


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): the first 1,297 digits to train on, the last 500 held
    out (the split of benchmarks/train_frontends.py)."""
    x, y = load_digits()
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def train_digits_model(out: Path, epochs: int = 12, seed: int = 0) -> Path:
    """Train the demo black box (clean images only) and save it as TorchScript; cached."""
    out.mkdir(parents=True, exist_ok=True)
    path, meta_path = out / "digits_cnn.pt", out / "digits_cnn.json"
    if meta_path.exists() and path.exists():
        cached = json.loads(meta_path.read_text())
        if cached.get("version") == MODEL_VERSION:
            return path
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split()
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
