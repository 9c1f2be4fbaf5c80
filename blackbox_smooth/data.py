"""Images in, float32 C×H×W arrays on the [0,1] scale out; and the bundled digits data set."""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UsageError
from .inputs import MAX_IMAGE_BYTES, read_bytes

if TYPE_CHECKING:
    from .options import ImageOptions

DIGITS_SIZE = 28


def parse_size(text: str | None) -> tuple[int, int] | None:
    """`--size HxW` (or a single number for a square)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not m:
        raise UsageError(f"--size {text!r} is not HxW (for example 28x28)")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if not (1 <= h <= 8192 and 1 <= w <= 8192):
        raise UsageError(f"--size {text!r} is out of range: each side must be 1..8192")
    return h, w


@dataclass(frozen=True)
class Fit:
    """How an image meets `--size HxW` (`--resize`, `--fill`): stretched to it (the aspect
    ratio lost), letterboxed (scaled to fit whole, centred, the rest `fill`, on [0,1], rounded
    to 8 bits like the pixels) or center-cropped (scaled to cover it, the centre kept). Every
    scaling is Pillow's bilinear, as stretch's."""

    mode: str = "stretch"
    fill: float = 0.5

    @classmethod
    def of(cls, imaging: ImageOptions) -> Fit:
        return cls(str(imaging.resize), 0.5 if imaging.fill is None else imaging.fill)

    def key(self) -> list[str | float]:
        """What enters an identity beside the size: nothing for stretch (keys made before
        --resize stay as they were), the fill only where it shows."""
        if self.mode == "stretch":
            return []
        return [self.mode, self.fill] if self.mode == "letterbox" else [self.mode]


STRETCH = Fit()


def fit_image(image: Image.Image, size: tuple[int, int], fit: Fit = STRETCH) -> Image.Image:
    """`image` (L or RGB) at `size` (H, W), as `fit` says."""
    h, w = size
    if (image.height, image.width) == size:
        return image
    if fit.mode == "stretch":
        return image.resize((w, h), Image.Resampling.BILINEAR)
    letterbox = fit.mode == "letterbox"
    scale = (min if letterbox else max)(h / image.height, w / image.width)
    nh, nw = max(1, round(image.height * scale)), max(1, round(image.width * scale))
    nh, nw = (min(nh, h), min(nw, w)) if letterbox else (max(nh, h), max(nw, w))
    if (nh, nw) != (image.height, image.width):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    if not letterbox:  # center-crop
        top, left = (nh - h) // 2, (nw - w) // 2
        return image.crop((left, top, left + w, top + h))
    value = round(fit.fill * 255)
    canvas = Image.new(image.mode, (w, h), value if image.mode == "L" else (value,) * 3)
    canvas.paste(image, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    fit: Fit = STRETCH,
) -> np.ndarray:
    """Read an image with Pillow → float32 C×H×W in [0,1].

    Grayscale files stay one channel (unless the model needs RGB: convert them beforehand);
    anything else becomes RGB, alpha dropped. `size` (H, W) resizes before noise is added (as
    `fit` says), so a certificate is about the image at that resolution.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"image not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not an image file")
    data = read_bytes(path, "image", MAX_IMAGE_BYTES, "an image file (PNG, JPEG, …)")
    return decode_image(data, path, size, grayscale, fit=fit)


class TooLarge(UsageError):
    """An image with more pixels than may be decoded (a decompression bomb)."""


def decode_image(
    data: bytes,
    name: str,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    max_pixels: int | None = None,
    fit: Fit = STRETCH,
) -> np.ndarray:
    """`load_image` of bytes already read (`name` in messages); `max_pixels` refuses a larger
    image from its header, before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.width * img.height
                if max_pixels is not None and pixels > max_pixels:
                    raise TooLarge(
                        f"{name} has {pixels:,} pixels, more than the {max_pixels:,} allowed"
                    )
                img.load()
                image = _to_mode(img, grayscale)
    except UsageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{name} is too large to decode safely ({e.__class__.__name__})") from e
    except UnidentifiedImageError as e:
        raise UsageError(f"{name} is not an image Pillow can read (PNG, JPEG, …)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{name} could not be decoded: {e}") from e
    except Exception as e:  # a hostile file may trip any decoder: still one line
        raise UsageError(f"{name} could not be decoded ({type(e).__name__}: {e})") from e
    del data
    if size is not None:
        image = fit_image(image, size, fit)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _to_mode(img: Image.Image, grayscale: bool) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if grayscale or img.mode in ("1", "L", "LA"):
        return img.convert("L")
    return img.convert("RGB")


def save_image(x: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a C×H×W [0,1] array as an 8-bit PNG (L or RGB)."""
    arr = np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    img.save(path)


def load_digits(size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits, upsampled to size×size, as (N×1×H×W, labels).

    Quantized to 8 bits so that an image written to PNG and read back is the same array.
    """
    import torch
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = torch.round(x.clamp(0, 1) * 255.0) / 255.0
    return x.numpy(), bunch.target.astype(np.int64)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_images(
    root: str | os.PathLike[str],
) -> tuple[list[str], list[int] | None, list[str]]:
    """The images in a folder → (paths, labels or None, class names), in a stable order.

    With one sub-folder per class (its name is the class) the labels are the indices of the
    sorted sub-folder names; with none, the folder's own images are listed, unlabeled. Files
    other than images (by suffix) are skipped; `root` must be a folder.
    """
    base = Path(root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        files = sorted(f for f in base.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        return [str(f) for f in files], None, []
    paths, labels = [], []
    for index, name in enumerate(classes):
        for f in sorted((base / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(f))
                labels.append(index)
    return paths, labels, classes


def load_folder(
    root: str | os.PathLike[str],
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
    fit: Fit = STRETCH,
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """A folder of images → (N×C×H×W float32, labels or None, class names).

    With one sub-folder per class the labels are the sorted sub-folder indices; a flat folder
    of images is unlabeled.
    """
    root = os.fspath(root)
    if not os.path.lexists(root):
        raise UsageError(f"--data {root} does not exist: give a folder of images")
    if not os.path.isdir(root):
        raise UsageError(f"--data {root} is a file, not a folder: give a folder of images")
    paths, labels, classes = list_images(root)
    if not paths:
        raise UsageError(f"--data {root} holds no images (.png, .jpg, …)")
    arrays = [load_image(path, size, grayscale, fit) for path in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UsageError(f"images in {root} differ in size ({len(shapes)} shapes): pass --size HxW")
    return np.stack(arrays), None if labels is None else np.array(labels, dtype=np.int64), classes
