"""How queries travel (`EndpointOptions`): batching, concurrency, retries, the HTTP protocol
and its label map, keys, and the input tensor a model takes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ..errors import UsageError
from ..memory import parse_bytes
from .fields import at_least, channel_values, enum_of, option, positive


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


class ImageFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"


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
            object.__setattr__(self, name, enum_of(kind, getattr(self, name), flag))
        if self.preset is not None:  # the preset's fields, where no flag of its own is given
            filled = zip(TENSOR_CONVENTION, PRESETS[self.preset], strict=True)
            for name, value in filled:
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        at_least("--batch", self.batch, 1)
        at_least("--concurrency", self.concurrency, 1)
        at_least("--retries", self.retries, 1)
        at_least("--top-k", self.top_k, 1)
        positive("--rps", self.rps)
        positive("--timeout", self.timeout)
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
