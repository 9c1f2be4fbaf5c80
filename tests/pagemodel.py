"""A user's own model at its own size, as the suite and `make bench-ownmodel` use it: an ONNX
classifier exported here at 3×S×S (S = 224, 320, …) with ImageNet normalisation expected on
its input, and labelled images it classifies well.

The classifier is the digits CNN behind a full-size front layer: it undoes the normalisation,
runs one 8-channel convolution at full size (real work and real activations at S×S), averages
the channels and resizes to 28×28 for the CNN. The images are digits scaled up to S×S in RGB.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from blackbox_smooth.data import save_image
from blackbox_smooth.digits import DigitsCNN, digits_split, train_digits_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PageModel(nn.Module):
    def __init__(self, digits: nn.Module) -> None:
        super().__init__()
        self.digits = digits
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x * self.std + self.mean
        # the stem's output weighs nothing in the answer but is computed at full size
        gray = rgb.mean(1, keepdim=True) + 0 * self.stem(x).mean(1, keepdim=True)
        small = F.interpolate(gray, size=(28, 28), mode="bilinear", align_corners=False)
        return self.digits(small)


def upscaled(image: torch.Tensor, size: int) -> torch.Tensor:
    """A 1×28×28 digit as a 3×size×size image in [0,1]."""
    big = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)
    return big[0].clamp(0, 1).repeat(3, 1, 1)


def make_page_model(folder: Path, size: int, train: int = 60, test: int = 8) -> Path:
    """Write folder/model.onnx, folder/train/ (`train` unlabelled images) and folder/test/
    (`test` images in a sub-folder per class); returns the ONNX file."""
    folder.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.load(str(train_digits_model(folder / "digits")))
    digits = DigitsCNN()
    digits.load_state_dict(scripted.state_dict())
    model = PageModel(digits).eval()
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path),
                          input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "n"}}, dynamo=False)  # fmt: skip
    x_tr, _, x_te, y_te = digits_split()
    (folder / "train").mkdir(exist_ok=True)
    for i in range(train):
        save_image(
            upscaled(torch.from_numpy(x_tr[i]), size).numpy(), folder / "train" / f"{i:04d}.png"
        )
    for i in range(test):
        label = folder / "test" / str(int(y_te[i]))
        label.mkdir(parents=True, exist_ok=True)
        save_image(upscaled(torch.from_numpy(x_te[i]), size).numpy(), label / f"{i:04d}.png")
    return path
