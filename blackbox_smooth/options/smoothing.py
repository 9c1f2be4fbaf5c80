"""The smoothed classifier a command certifies with (`SmoothingOptions`), how image files
become arrays (`ImageOptions`), how each is certified (`CertifyOptions`), and the data set and
cluster of `evaluate`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..checks import check_adaptive, check_sampling, check_sigma
from ..endpoint import Endpoint
from ..errors import UsageError
from .fields import at_least, enum_of, option
from .wire import EndpointOptions


class ResizeMode(StrEnum):
    stretch = "stretch"
    letterbox = "letterbox"
    center_crop = "center-crop"


class Bound(StrEnum):
    union = "union"
    cs = "cs"


@dataclass(frozen=True)
class SmoothingOptions:
    """The smoothed classifier a command certifies with: the endpoint (the black box), an
    optional front end or LoRA adapter before it, σ and the seed of the noise, and where its
    answers are kept and how many may be sent."""

    endpoint: Endpoint = option(
        "",
        "python:FILE.py:FUNC | python:pkg.mod:FUNC | torch:FILE.pt | torch:FILE.py:FUNC | "
        "onnx:FILE.onnx | an http(s) URL: Open Inference Protocol (…/v2/models/NAME/infer), "
        "TorchServe (…/predictions/NAME), Hugging Face, Cloud Vision, or any JSON API "
        "(--protocol generic)",
        flags=("--endpoint", "-e"),
        required=True,
        parsed_from=str,
    )
    sigma: float = option(math.nan, "Noise level σ, on the [0,1] pixel scale.", required=True)
    seed: int = option(0, "Noise seed: the same seed gives the same counts.")
    frontend: Path | None = option(None, "A front end trained by `bbsmooth train`.")
    adapter: Path | None = option(
        None, "A LoRA run (train --method lora) for a torch:FILE.py:FUNC."
    )
    force: bool = option(False, "Use a front end trained for another σ, size or box.")
    max_queries: int | None = option(None, "Stop before sending more than this many queries.")
    cache: Path | None = option(
        None,
        "Cache directory (default: $BBSMOOTH_CACHE, else the user cache: `bbsmooth cache info`).",
    )
    no_cache: bool = option(False, "Neither read nor write the cache.")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.")
    wire: EndpointOptions = field(default_factory=EndpointOptions)

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        at_least("--max-queries", self.max_queries, 0)
        if self.cache is not None and self.no_cache:
            raise UsageError("--cache and --no-cache contradict each other: pick one")
        object.__setattr__(self, "endpoint", Endpoint.parse(self.endpoint))
        self.endpoint.check_file()


@dataclass(frozen=True)
class ImageOptions:
    """How image files become arrays, before any noise."""

    size: str | None = option(None, "Resize to HxW before adding noise.")
    grayscale: bool = option(False, "Convert images to one channel.")
    resize: ResizeMode = option(
        ResizeMode.stretch,
        "How --size is met: stretch (to HxW, the aspect ratio lost), letterbox (scaled to fit "
        "whole, the rest padded with --fill) or center-crop (scaled to cover HxW, the centre "
        "kept).",
    )
    fill: float | None = option(
        None,
        "--resize letterbox: the padding's value on [0,1], rounded to 8 bits like the pixels "
        "(default 0.5, mid grey).",
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "resize", enum_of(ResizeMode, self.resize or "stretch", "--resize")
        )
        if self.resize != ResizeMode.stretch and self.size is None:
            raise UsageError(f"--resize {self.resize} says how to meet --size HxW: add --size")
        if self.fill is not None:
            if self.resize != ResizeMode.letterbox:
                raise UsageError("--fill pads --resize letterbox: add that, or drop --fill")
            if not (math.isfinite(self.fill) and 0 <= self.fill <= 1):
                raise UsageError(f"--fill must be a value on [0,1], got {self.fill}")


DEFAULT_N = 10_000


@dataclass(frozen=True)
class CertifyOptions:
    """CERTIFY's sample sizes and level; with `target_radius` or `budget` it runs adaptively
    (n is then the cap) and stops as soon as the question is settled."""

    n0: int = option(100, "Selection samples.")
    n: int | None = option(None, "Estimation samples (default 10,000; the cap when adaptive).")
    alpha: float = option(0.001, "Failure probability of the guarantee.")
    target_radius: float | None = option(
        None, "Stop as soon as certified at this radius, or never will be (n: the cap)."
    )
    budget: int | None = option(None, "Queries per image (n0 included); stops early.")
    bound: Bound = option(
        Bound.union,
        "Adaptive bound: union (Clopper–Pearson at α/K per look) or cs (confidence "
        "sequence, valid at every n: fewer queries).",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "bound", enum_of(Bound, self.bound, "--bound"))
        if self.budget is not None and self.target_radius is not None:
            raise UsageError(
                "--budget and --target-radius ask two different questions (the largest radius "
                "within N queries; whether radius R is certified): pick one"
            )
        if self.budget is not None and self.n is not None:
            raise UsageError("--budget sets n (the budget less --n0): drop --n")
        check_sampling(n0=self.n0, n=DEFAULT_N if self.n is None else self.n, alpha=self.alpha)
        if self.budget is not None and self.budget <= self.n0:
            raise UsageError(
                f"--budget {self.budget} must exceed --n0 {self.n0} (queries per image)"
            )
        if not self.adaptive and self.bound != Bound.union:
            raise UsageError("--bound picks the bound of adaptive runs: add --target-radius R")
        check_adaptive(self.target_radius, self.bound)

    @property
    def adaptive(self) -> bool:
        return self.target_radius is not None or self.budget is not None

    @property
    def n_estimation(self) -> int:
        """n, the estimation samples (the cap when adaptive)."""
        if self.budget is not None:
            return self.budget - self.n0
        return DEFAULT_N if self.n is None else self.n

    @property
    def per_image(self) -> int:
        """The most queries one image can take."""
        return self.n0 + self.n_estimation

    @property
    def mode(self) -> str:
        return "budget" if self.budget else "target" if self.adaptive else "fixed"

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of `Smoothed.certify` or, adaptive, `Smoothed.certify_adaptive`."""
        if not self.adaptive:
            return {"n0": self.n0, "n": self.n_estimation, "alpha": self.alpha}
        return {
            "n0": self.n0,
            "n_max": self.n_estimation,
            "alpha": self.alpha,
            "target_radius": self.target_radius,
            "bound": self.bound.value,
        }


@dataclass(frozen=True)
class DatasetOptions:
    """A labelled data set to evaluate on, and the papers' way of taking a subset of it."""

    data: Path = option(Path(), "Folder of class sub-folders, or a path,label CSV.", required=True)
    classes: str | None = option(None, "Comma-separated class names in index order.")
    limit: int | None = option(None, "At most this many images.")
    skip: int = option(0, "Start at this image index.")
    every: int = option(1, "Take every K-th image (papers: 20 on CIFAR).")

    def __post_init__(self) -> None:
        if self.skip < 0 or self.every < 1 or (self.limit is not None and self.limit < 1):
            raise UsageError("--skip must be >= 0, --every >= 1 and --limit >= 1")

    @property
    def class_order(self) -> list[str] | None:
        return [c.strip() for c in self.classes.split(",")] if self.classes else None


@dataclass(frozen=True)
class ClusterOptions:
    """`evaluate --ray`: where the images are certified (cluster.py). Without `ray`, here."""

    ray: str | None = option(
        None,
        "Certify on a Ray cluster: auto (the running cluster, else a local one started now) or "
        "its address (ray://HOST:10001, HOST:6379). Needs pip install 'blackbox_smooth[ray]'.",
        flags=("--ray",),
    )
    workers: int | None = option(
        None, "Ray workers (default: one per GPU for a local model on GPUs, else one per CPU)."
    )

    def __post_init__(self) -> None:
        if self.ray is not None and not self.ray.strip():
            raise UsageError("--ray takes auto or the cluster's address")
        at_least("--workers", self.workers, 1)
        if self.workers is not None and self.ray is None:
            raise UsageError("--workers sets the Ray workers: add --ray auto (or an address)")
