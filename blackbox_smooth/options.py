"""Every option a command takes, declared once: its type, its default, its help and its check.

The library takes these frozen dataclasses as they are; the CLI derives its flags from them
(`help_of`, `cli.with_options`), so a default or a help text lives in one place. Each checks
its values when constructed, before anything slow (a model load, a request) happens. This
module imports nothing heavy: `bbsmooth --help` reads it.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .checks import check_adaptive, check_sampling, check_sigma
from .errors import UsageError
from .kinds import KINDS
from .memory import parse_bytes


class Protocol(StrEnum):
    kserve = "kserve"
    huggingface = "huggingface"
    torchserve = "torchserve"
    gcv = "gcv"
    generic = "generic"


class Layout(StrEnum):
    nchw = "nchw"
    nhwc = "nhwc"
    flat = "flat"


class InputDtype(StrEnum):
    fp32 = "fp32"
    uint8 = "uint8"


class ChannelOrder(StrEnum):
    rgb = "rgb"
    bgr = "bgr"


class Preset(StrEnum):
    imagenet = "imagenet"
    clip = "clip"
    caffe = "caffe"


# What a --preset stands for, as the flags it fills would be spelled by hand: (--input-mean,
# --input-std, --channel-order, --input-scale). The mean and std are in the scaled unit and the
# model's channel order (caffe's in BGR on 0–255); caffe's std is 1, left unset (no division),
# as a user spelling its convention by hand leaves it.
PRESETS: dict[Preset, tuple[str, str | None, ChannelOrder, float]] = {
    Preset.imagenet: ("0.485,0.456,0.406", "0.229,0.224,0.225", ChannelOrder.rgb, 1.0),
    Preset.clip: (
        "0.48145466,0.4578275,0.40821073",
        "0.26862954,0.26130258,0.27577711",
        ChannelOrder.rgb,
        1.0,
    ),
    Preset.caffe: ("103.939,116.779,123.68", None, ChannelOrder.bgr, 255.0),
}


class ResizeMode(StrEnum):
    stretch = "stretch"
    letterbox = "letterbox"
    center_crop = "center-crop"


class ImageFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"


class Bound(StrEnum):
    union = "union"
    cs = "cs"


def option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    required: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with the help text its flag shows (`flags`: when not --field-name;
    `required`: the CLI asks for it; `cli=False`: for library callers only)."""
    metadata = {"help": help, "flags": flags, "required": required, "cli": cli}
    return field(default=default, metadata=metadata)


def command_flags(options: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild `options` (a dataclass of options, with those inside it) from
    their defaults: what a hint prints as the next command to type."""
    out: list[str] = []
    implied = getattr(options, "implied", lambda: ())()  # what another flag fills (--preset)
    for f in cli_fields(type(options)):
        value = getattr(options, f.name)
        if f.name in exclude or f.name in implied:
            continue
        if is_dataclass(value):
            out += command_flags(value, exclude)
            continue
        if value == f.default or value is None:
            continue
        spelled = f.metadata["flags"][0] if f.metadata["flags"] else f"--{f.name}"
        on, _, off = spelled.replace("_", "-").partition("/")
        if isinstance(value, bool):
            out.append(on if value else off or f"--no-{on.removeprefix('--')}")
        else:
            text = value.value if isinstance(value, StrEnum) else str(value)
            out += [on, text]
    return out


def help_of(cls: type, name: str) -> str:
    return str(_field(cls, name).metadata["help"])


def default_of(cls: type, name: str) -> Any:
    f = _field(cls, name)
    return f.default if f.default is not MISSING else MISSING


def cli_fields(cls: type) -> list[Any]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def _field(cls: type, name: str) -> Any:
    return next(f for f in fields(cls) if f.name == name)


def _enum(kind: type[StrEnum], value: Any, flag: str) -> Any:
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise UsageError(
            f"{flag} {value!r} is unknown: use {', '.join(k.value for k in kind)}"
        ) from None


def channel_values(flag: str, text: str | None) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' → (0.485, 0.456, 0.406): one value per channel, or one for all."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not a list of numbers: give one per channel, comma-separated "
            "(0.485,0.456,0.406)"
        ) from None
    if not all(math.isfinite(v) for v in values) or len(values) > 4:
        raise UsageError(f"{flag} {text!r}: give 1 to 4 finite numbers, one per channel")
    return values


def _at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:
        raise UsageError(f"{flag} must be >= {low}, got {value}")


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be > 0, got {value}")


TENSOR_CONVENTION = ("input_mean", "input_std", "channel_order", "input_scale")  # a preset's


@dataclass(frozen=True)
class EndpointOptions:
    """How queries travel: what every command that talks to an endpoint shares."""

    batch: int | None = option(None, "Images per request (1024 local, 64 HTTP).")
    concurrency: int = option(16, "Requests in flight at once.")
    rps: float | None = option(None, "At most this many requests/s.")
    timeout: float = option(60.0, "Seconds before a request times out.")
    retries: int = option(8, "Attempts per request, the first included.")
    protocol: Protocol | None = option(None, "HTTP adapter (default: from the URL's shape).")
    protocol_config: Path | None = option(None, "JSON config of the generic adapter.")
    labels: Path | None = option(None, "Label map: vendor label → class (JSON, CSV).")
    encoding: ImageFormat = option(ImageFormat.png, "Image file sent to file-taking APIs.")
    jpeg_quality: int = option(95, "JPEG quality (--encoding jpeg).")
    top_k: int | None = option(
        None, "Labels per answer from APIs that cap them (Hugging Face 5, Cloud Vision 10)."
    )
    auth: str | None = option(
        None, "bearer | key | header:NAME | query:NAME | none (default: usual)."
    )
    api_key_env: str = option("BBSMOOTH_API_KEY", "Environment variable holding the API key.")
    ca_bundle: Path | None = option(None, "CA certificates for a private TLS endpoint.")
    input_layout: Layout | None = option(
        None, "Model input layout (default: the model's spec, else nchw)."
    )
    input_dtype: InputDtype | None = option(
        None, "Model input dtype (default: the model's spec, else fp32)."
    )
    preset: Preset | None = option(
        None,
        "imagenet | clip | caffe: a model family's input convention, filling --input-mean, "
        "--input-std, --channel-order and --input-scale (imagenet, clip: their mean and std, "
        "RGB on [0,1]; caffe: BGR on 0-255, mean 103.939,116.779,123.68, std 1). Any of those "
        "flags given too replaces that part of the preset; the model's identity (fingerprint, "
        "cache) is that of the flags spelled out.",
    )
    input_scale: float | None = option(
        None, "The input value [0,1] maps to (default 1 fp32, 255 uint8)."
    )
    input_mean: str | None = option(
        None, "Subtracted per channel after scaling, e.g. 0.485,0.456,0.406 (fp32 inputs)."
    )
    input_std: str | None = option(
        None, "Divided per channel after the mean, e.g. 0.229,0.224,0.225 (fp32 inputs)."
    )
    channel_order: ChannelOrder | None = option(
        None, "rgb (default) or bgr: the channel order the model takes."
    )
    input_name: str | None = option(None, "Model input name (default: its spec, else input-0).")
    output: str | None = option(None, "OIP output to read (default: the first).")
    max_response_bytes: int = option(32 << 20, "Refuse answers larger than this, decompressed.")
    max_memory: str = option(
        "1G",
        "Memory for images in flight (noise drawn ahead, requests, a local model's forward "
        "pass, a front end training): steps are sized from it; the program itself adds ~0.4G.",
    )
    endpoint_id: str | None = option(
        None,
        "Stands for the URL in cache keys and front-end checks: a name, or the URL the model "
        "had (the same model at a new address keeps its cache and front ends).",
    )
    # Waits between retries: exponential with full jitter (tests shorten them).
    backoff: float = option(0.25, "Seconds before the first retry.", cli=False)
    max_backoff: float = option(20.0, "Longest wait between retries.", cli=False)

    def __post_init__(self) -> None:
        coerce = {
            "protocol": (Protocol, "--protocol"),
            "encoding": (ImageFormat, "--encoding"),
            "input_layout": (Layout, "--input-layout"),
            "input_dtype": (InputDtype, "--input-dtype"),
            "channel_order": (ChannelOrder, "--channel-order"),
            "preset": (Preset, "--preset"),
        }
        for name, (kind, flag) in coerce.items():
            object.__setattr__(self, name, _enum(kind, getattr(self, name), flag))
        if self.preset is not None:  # the preset's fields, where no flag of its own is given
            filled = zip(TENSOR_CONVENTION, PRESETS[self.preset], strict=True)
            for name, value in filled:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        _at_least("--batch", self.batch, 1)
        _at_least("--concurrency", self.concurrency, 1)
        _at_least("--retries", self.retries, 1)
        _at_least("--top-k", self.top_k, 1)
        _positive("--rps", self.rps)
        _positive("--timeout", self.timeout)
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality must be 1..100, got {self.jpeg_quality}")
        parse_bytes(self.max_memory)
        channel_values("--input-mean", self.input_mean)
        channel_values("--input-std", self.input_std)
        if self.endpoint_id is not None and not (
            0 < len(self.endpoint_id) <= 500 and self.endpoint_id.isprintable()
        ):
            raise UsageError("--endpoint-id must be 1 to 500 printable characters")

    def implied(self) -> tuple[str, ...]:
        """The flags --preset filled as it fills them (not given apart)."""
        if self.preset is None:
            return ()
        filled = zip(TENSOR_CONVENTION, PRESETS[self.preset], strict=True)
        return tuple(name for name, value in filled if getattr(self, name) == value)


@dataclass(frozen=True)
class SmoothingOptions:
    """The smoothed classifier a command certifies with: the endpoint (the black box), an
    optional front end or LoRA adapter before it, σ and the seed of the noise, and where its
    answers are kept and how many may be sent."""

    endpoint: str = option(
        "",
        "python:FILE.py:FUNC | python:pkg.mod:FUNC | torch:FILE.pt | torch:FILE.py:FUNC | "
        "onnx:FILE.onnx | an http(s) URL: Open Inference Protocol (…/v2/models/NAME/infer), "
        "TorchServe (…/predictions/NAME), Hugging Face, Cloud Vision, or any JSON API "
        "(--protocol generic)",
        flags=("--endpoint", "-e"),
        required=True,
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
        _at_least("--max-queries", self.max_queries, 0)
        if self.cache is not None and self.no_cache:
            raise UsageError("--cache and --no-cache contradict each other: pick one")
        check_endpoint(self.endpoint)

    @property
    def local_model(self) -> str | None:
        """The file or module of a python: or torch: endpoint."""
        if self.endpoint.startswith(("torch:", "python:", "onnx:")):
            return self.endpoint.split(":")[1]
        return None


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
        object.__setattr__(self, "resize", _enum(ResizeMode, self.resize or "stretch", "--resize"))
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
        object.__setattr__(self, "bound", _enum(Bound, self.bound, "--bound"))
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


METHODS = ("distill", "spsa", "whitebox")  # black-box training methods (training/)
OBJECTIVES = ("stability", "classification", "mse")


@dataclass(frozen=True)
class TrainSettings:
    """How `bbsmooth train` learns a front end (training/)."""

    sigma: float = option(math.nan, "Noise level σ, on the [0,1] pixel scale.", required=True)
    frontend: str = option("denoiser", "prompt | denoiser | coordinator")
    method: str = option("distill", "distill | spsa | whitebox | lora")
    objective: str = option("stability", "stability | classification | mse")
    epochs: int = option(5, "Epochs, each validated on the real black box.")
    max_queries: int | None = option(20_000, "Never send more than this many queries.")
    lora_rank: int = option(
        0,
        "Rank of the LoRA (peft) this run trains: on the front end (0: none) or, with "
        "--method lora, inside the model (default 8).",
    )
    prompt_width: int = option(0, "prompt: frame width (0: full image).")
    val_fraction: float = option(0.1, "Held-out share for validation.")
    val_draws: int = option(4, "Noise draws per held-out image at each validation.")
    confirm_draws: int = option(
        16,
        "Further draws on the held-out images the start answers right under every draw: an "
        "epoch is kept only if as many stay right under all of them, level by level of 16 "
        "(0: off).",
    )
    patience: int = option(
        2, "Stop when validation has not improved for this many epochs (0: never)."
    )
    head_stage: bool = option(
        True,
        "distill on a denoiser or coordinator: once validation stops improving, train an output "
        "head by SPSA on the queries left (needs class scores).",
        flags=("--head-stage/--no-head-stage",),
    )
    seed: int = option(0, "Noise seed: the same seed gives the same counts.")
    batch_size: int = option(64, "Images per optimiser step.", cli=False)
    lr: float = option(3e-4, "Learning rate.", cli=False)
    pretrain_epochs: int = option(30, "MSE pre-training epochs (no queries).")
    start: Path | None = option(
        None,
        "Start from this run's front end instead of pre-training one (an --objective mse run "
        "of the same front end, image size and σ): several methods, one pre-training.",
    )
    passes: int = option(10, "Passes over the images per epoch (distill, whitebox).", cli=False)
    force: bool = option(
        False,
        "Train even when the held-out images cannot tell a better epoch from the start (too "
        "few, or all right from the start): a warning instead of a refusal.",
    )

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if self.frontend not in KINDS:
            raise UsageError(f"unknown --frontend {self.frontend!r}: use {', '.join(KINDS)}")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}: use {', '.join(METHODS)} or lora")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown --objective {self.objective!r}: use {', '.join(OBJECTIVES)}")
        if self.objective == "mse" and self.frontend == "prompt":
            raise UsageError("--objective mse pre-trains a denoiser or coordinator, not a prompt")
        if self.start is not None and self.frontend == "prompt":
            raise UsageError("--start gives a pre-trained front end; a prompt starts at zero")
        if self.start is not None and self.objective == "mse":
            raise UsageError("--start with --objective mse would only copy the start: drop one")
        _at_least("--epochs", self.epochs, 1)
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        _at_least("--lora-rank", self.lora_rank, 0)
        _at_least("--max-queries", self.max_queries, 0)
        _at_least("--val-draws", self.val_draws, 1)
        _at_least("--confirm-draws", self.confirm_draws, 0)
        _at_least("--patience", self.patience, 0)

    def check(self, labelled: bool) -> None:
        """What depends on the data: the classification objective needs labels."""
        if self.objective == "classification" and not labelled:
            raise UsageError(
                "--objective classification needs labelled data: one sub-folder per class in "
                "--data (or use --objective stability, which needs no labels)"
            )


def sigma_warning(sigma: float) -> str | None:
    """σ above 1 on the [0,1] pixel scale drowns any image (a guess of 25 on the 0–255 scale
    is 25 times the image's whole range): legal, but almost surely not what was meant."""
    if sigma <= 1:
        return None
    return (
        f"--sigma {sigma:g} is on the [0,1] pixel scale, where noise above 1 drowns the image; "
        f"for {sigma:g} on the 0–255 scale give --sigma {sigma / 255:.4g}"
    )


ENDPOINT_SCHEMES = (
    "python:FILE.py:FUNC, python:package.module:FUNC, torch:FILE.pt, torch:FILE.py:FUNC, "
    "onnx:FILE.onnx, or an http(s):// URL (Open Inference Protocol …/v2/models/NAME/infer, "
    "TorchServe …/predictions/NAME, Hugging Face, Cloud Vision, or any API with --protocol)"
)


def endpoint_file(spec: str) -> tuple[str, str] | None:
    """The local file an endpoint loads and what messages call it; None for a URL or a
    python:package.module:FUNC."""
    if spec.startswith("onnx:"):
        return spec.removeprefix("onnx:"), "ONNX file"
    target = spec.removeprefix("torch:").removeprefix("python:")
    if target != spec and ".py:" in target:
        return target.rpartition(":")[0], "python endpoint file"
    if spec.startswith("torch:"):
        return target, "TorchScript file"
    return None


def check_endpoint(spec: str) -> None:
    """A scheme bbsmooth knows and, for a local model, a file that is there: checked when the
    options are built, before torch or a model loads (a typo costs no seconds)."""
    if spec.startswith(("http://", "https://")):
        return  # the URL itself is checked when the endpoint opens (adapters.check_url)
    if not spec.startswith(("python:", "torch:", "onnx:")):
        shown = spec.split("?")[0][:200]  # a query string may carry a key
        raise UsageError(f"unknown endpoint {shown!r}: use one of {ENDPOINT_SCHEMES}")
    local = endpoint_file(spec)
    if local is not None and not os.path.lexists(local[0]):
        raise UsageError(f"{local[1]} not found: {local[0]}")


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
        _at_least("--workers", self.workers, 1)
        if self.workers is not None and self.ray is None:
            raise UsageError("--workers sets the Ray workers: add --ray auto (or an address)")


@dataclass(frozen=True)
class LoraSettings:
    """`train --method lora`: LoRA inside a local classifier (PEFTSmoothing's white-box way)."""

    sigma: float = option(math.nan, "Noise level σ, on the [0,1] pixel scale.", required=True)
    rank: int = option(8, "LoRA rank.", flags=("--lora-rank",))
    targets: str | None = option(
        None, "--method lora: comma-separated layer names.", flags=("--lora-targets",)
    )
    objective: str = option("stability", "stability | classification")
    epochs: int = option(5, "Epochs.")
    val_fraction: float = option(0.1, "Held-out share for validation.")
    seed: int = option(0, "Seed of the split and the noise.")

    def __post_init__(self) -> None:
        check_sigma(self.sigma)
        if self.rank < 1:
            raise UsageError(f"--lora-rank must be >= 1 for --method lora, got {self.rank}")

    @property
    def target_list(self) -> list[str] | None:
        return self.targets.split(",") if self.targets else None


@dataclass(frozen=True)
class ServeOptions:
    """`bbsmooth serve`: a local model over the Open Inference Protocol, bounded against its
    clients (request size, slow clients, connections) and optionally behind a key."""

    endpoint: str = option(
        "", "torch:FILE.pt or python:FILE.py:FUNC", flags=("--endpoint", "-e"), required=True
    )
    name: str = option("model", "Model name in /v2/models/NAME.")
    host: str = option("127.0.0.1", "Address to bind (loopback unless you mean it).")
    port: int = option(8000, "Port (0: any free port).")
    delay: float = option(0.0, "Seconds of service delay per request.")
    device: str = option("auto", "auto (CUDA when present), cpu or cuda.")
    max_request_bytes: int = option(
        64 * 2**20, "Largest request body accepted (413 beyond, unread)."
    )
    client_timeout: float = option(
        30.0, "Seconds a connection may take to send a request's head, and a body to arrive."
    )
    max_connections: int = option(
        256, "Connections open at once (beyond: the longest idle is closed; 503 if none is)."
    )
    max_bodies: int = option(
        2, "Request bodies read, parsed and answered at once (the others wait their turn)."
    )
    api_key_env: str | None = option(
        None,
        "Require Authorization: Bearer KEY, the key read from this environment variable "
        "(health probes stay open).",
    )

    def __post_init__(self) -> None:
        # Every check before the model loads: a typo fails at once, not after the load.
        if not self.endpoint.startswith(("torch:", "python:")):
            raise UsageError("serve needs a local endpoint: torch:FILE.pt or python:FILE.py:FUNC")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        _at_least("--max-request-bytes", self.max_request_bytes, 1)
        _at_least("--max-connections", self.max_connections, 1)
        _at_least("--max-bodies", self.max_bodies, 1)
        _positive("--client-timeout", self.client_timeout)


@dataclass(frozen=True)
class ProxyOptions:
    """`bbsmooth proxy`: the smoothed classifier as an HTTP service, bounded against its
    clients (body size, pixels, bodies in memory, a deadline) and optionally behind keys with
    per-client quotas."""

    host: str = option("127.0.0.1", "Address to bind (loopback unless you mean it).")
    port: int = option(8080, "Port (0: any free port).")
    tls_key: Path | None = option(None, "TLS private key file (PEM); with --tls-cert: HTTPS.")
    tls_cert: Path | None = option(None, "TLS certificate chain file (PEM).")
    client_keys_file: Path | None = option(
        None, "Client API keys, one per line: requests then need Authorization: Bearer KEY."
    )
    client_keys_env: str | None = option(
        None, "Environment variable holding comma-separated client API keys (as the file)."
    )
    quota: int | None = option(
        None, "Upstream queries each client key may cost per --quota-period (429 beyond)."
    )
    quota_period: float = option(3600.0, "Seconds of a quota period.")
    deadline: float = option(
        120.0,
        "Seconds a request may take (504 beyond; the certification goes on and is cached, so "
        "the same request again is answered from the cache).",
    )
    max_body_bytes: int = option(16 * 2**20, "Largest request body (413 beyond, unread).")
    max_pixels: int = option(
        40_000_000, "Largest image, in pixels, decoded (a decompression bomb: 413)."
    )
    max_bodies: int = option(32, "Request bodies held in memory at once (503 beyond).")
    client_timeout: float = option(
        30.0,
        "Seconds a connection may take to send a request's head, and a body to arrive (408 "
        "beyond: a slow drip).",
    )
    max_connections: int = option(
        1024, "Connections open at once (beyond: the longest idle is closed; 503 if none is)."
    )
    max_batch: int = option(16, "Images in one Open Inference Protocol request.")
    name: str = option("smoothed", "Model name of the Open Inference Protocol route.")
    shutdown_grace: float = option(
        30.0, "On SIGTERM, seconds to finish the requests in flight before stopping."
    )
    ray: str | None = option(
        None,
        "Serve as a Ray Serve deployment: auto (the running cluster, else a local one started "
        "now) or its address; --max-queries, --rps and --quota hold for all replicas together. "
        "Needs pip install 'blackbox_smooth[ray]'.",
        flags=("--ray",),
    )
    replicas: int = option(2, "Ray Serve replicas (with --ray), each with its own black box.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        if (self.tls_key is None) != (self.tls_cert is None):
            raise UsageError("--tls-key and --tls-cert go together: give both, or neither")
        _at_least("--quota", self.quota, 1)
        _positive("--quota-period", self.quota_period)
        _positive("--deadline", self.deadline)
        _at_least("--max-body-bytes", self.max_body_bytes, 1024)
        _at_least("--max-pixels", self.max_pixels, 1)
        _at_least("--max-bodies", self.max_bodies, 1)
        _at_least("--max-connections", self.max_connections, 1)
        _at_least("--max-batch", self.max_batch, 1)
        _positive("--shutdown-grace", self.shutdown_grace)
        _positive("--client-timeout", self.client_timeout)
        _at_least("--replicas", self.replicas, 1)
        if self.ray is not None and not self.ray.strip():
            raise UsageError("--ray takes auto or the cluster's address")
        if self.ray is not None and self.tls_cert is not None:
            raise UsageError(
                "--tls-cert with --ray: Ray Serve's HTTP proxy serves plain HTTP; put TLS in "
                "front of it (a load balancer), or serve without --ray"
            )
        if not (0 < len(self.name) <= 100 and all(c.isalnum() or c in "-_." for c in self.name)):
            raise UsageError("--name must be 1 to 100 letters, digits, '-', '_' or '.'")
