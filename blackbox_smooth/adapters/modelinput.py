"""What a tensor endpoint (`onnx:`, `torch:`, the Open Inference Protocol) is fed: the noisy
images clipped to [0,1], then mapped to the model's own input convention: channel order, scale,
per-channel mean and std, dtype, layout.

All of it runs after the noise, so it is part of the base classifier (and of the fingerprint)
and the certificate stays valid for the [0,1] image. It runs once per request, as a handful of
vectorised numpy operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..options import ChannelOrder, InputDtype, Layout, channel_values


@dataclass(frozen=True)
class ModelInput:
    """The model's input convention. `scale` is the value [0,1] maps to (None: 1 for fp32, 255
    for uint8); `mean` and `std` are per channel (or one for all), in that scaled unit, and
    apply to fp32 inputs only; `channel_order` bgr reverses RGB."""

    layout: Layout = Layout.nchw
    dtype: InputDtype = InputDtype.fp32
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channel_order: ChannelOrder = ChannelOrder.rgb

    def __post_init__(self) -> None:
        if self.scale is not None and not self.scale > 0:
            raise UsageError(f"--input-scale must be > 0, got {self.scale}")
        if self.dtype == InputDtype.uint8 and (self.mean or self.std):
            raise UsageError(
                "--input-mean and --input-std (and a --preset's) apply to fp32 inputs: a uint8 "
                "model normalises inside itself; drop them or use --input-dtype fp32"
            )
        if self.std is not None and not all(s > 0 for s in self.std):
            raise UsageError(f"--input-std must be > 0 for every channel, got {self.std}")

    @classmethod
    def of(
        cls, flags: Any, layout: Layout | None = None, dtype: InputDtype | None = None
    ) -> ModelInput:
        """From the --input-* flags (EndpointOptions, or KServeOptions, which name them alike);
        `layout` and `dtype` (from the model's own spec) stand where a flag is unset, then the
        defaults."""
        return cls(
            layout=flags.input_layout or layout or Layout.nchw,
            dtype=flags.input_dtype or dtype or InputDtype.fp32,
            scale=flags.input_scale,
            mean=channel_values("--input-mean", flags.input_mean),
            std=channel_values("--input-std", flags.input_std),
            channel_order=flags.channel_order or ChannelOrder.rgb,
        )

    @property
    def wire_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 255.0 if self.dtype == InputDtype.uint8 else 1.0

    @property
    def normalises(self) -> bool:
        return bool(self.mean or self.std or self.channel_order == ChannelOrder.bgr)

    def describe(self) -> dict[str, Any]:
        """For the fingerprint: the normalisation only when there is one, so that the
        fingerprints (and cached answers) of models without one stay as they were."""
        out: dict[str, Any] = {}
        if self.normalises:
            out = {"mean": self.mean, "std": self.std, "channel_order": self.channel_order}
        return out

    def check_channels(self, channels: int) -> None:
        for flag, values in (("--input-mean", self.mean), ("--input-std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise UsageError(
                    f"{flag} has {len(values)} values for {channels}-channel images: give one "
                    f"per channel, or one for all"
                )
        if self.channel_order == ChannelOrder.bgr and channels != 3:
            raise UsageError(f"--channel-order bgr needs 3-channel images, not {channels}")

    def apply(self, images: torch.Tensor) -> np.ndarray:
        """N×C×H×W noisy images → the model's input array (float32 or uint8, in its layout).

        In numpy on the CPU, where the bodies are built anyway: torch would hand each small
        request's few operations to its thread pool, whose threads then spin while the image is
        encoded (that doubled the client's CPU per query). Every step is the same IEEE float32
        operation torch would do (rounding half to even), so the values are torch's too."""
        x = np.clip(images.detach().cpu().numpy().astype(np.float32, copy=False), 0.0, 1.0)
        if self.channel_order == ChannelOrder.bgr:
            self.check_channels(x.shape[1])
            x = x[:, ::-1]
        if self.wire_scale != 1.0:  # x is our own copy from here on: change it in place
            np.multiply(x, np.float32(self.wire_scale), out=x)
        if self.dtype == InputDtype.uint8:
            x = np.clip(np.rint(x, out=x), 0, 255, out=x).astype(np.uint8)
        elif self.mean or self.std:
            self.check_channels(x.shape[1])
            if self.mean:
                x -= np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
            if self.std:
                x /= np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        if self.layout == Layout.nhwc:
            x = x.transpose(0, 2, 3, 1)
        elif self.layout == Layout.flat:
            x = x.reshape(len(x), -1)
        return np.ascontiguousarray(x)


def layout_of(shape: Any) -> Layout | None:
    """A published input shape → its layout: [N, C, H, W] nchw, [N, H, W, C] nhwc, [N, D]
    flat (C is 1 or 3; N and the sizes may be names or -1); None when it cannot tell."""
    if not isinstance(shape, list | tuple):
        return None
    if len(shape) == 2:
        return Layout.flat
    if len(shape) == 4:
        if shape[1] in (1, 3) and shape[3] not in (1, 3):
            return Layout.nchw
        if shape[3] in (1, 3) and shape[1] not in (1, 3):
            return Layout.nhwc
    return None
