"""Every option a command takes, declared once: its type, its default, its help and its check.

The library takes these frozen dataclasses as they are; the CLI derives its flags from them
(`help_of`, `flags.with_options`), so a default or a help text lives in one place. Each checks
its values when constructed, before anything slow (a model load, a request) happens. This
module imports nothing heavy: `bbsmooth --help` reads it.
"""

from __future__ import annotations

from ..checks import check_sampling, check_sigma
from .fields import (
    cli_fields,
    command_flags,
    default_of,
    help_of,
    option,
    sigma_warning,
)
from .servers import ProxyOptions, ServeOptions
from .smoothing import (
    DEFAULT_N,
    Bound,
    CertifyOptions,
    ClusterOptions,
    DatasetOptions,
    ImageOptions,
    ResizeMode,
    SmoothingOptions,
)
from .training import KINDS, METHODS, OBJECTIVES, LoraSettings, TrainSettings
from .wire import (
    PRESETS,
    TENSOR_CONVENTION,
    ChannelOrder,
    EndpointOptions,
    ImageFormat,
    InputDtype,
    Layout,
    Preset,
    Protocol,
    channel_values,
)

__all__ = [
    "DEFAULT_N", "KINDS", "METHODS", "OBJECTIVES", "PRESETS", "TENSOR_CONVENTION", "Bound",
    "CertifyOptions", "ChannelOrder", "ClusterOptions", "DatasetOptions", "EndpointOptions",
    "ImageFormat", "ImageOptions", "InputDtype", "Layout", "LoraSettings", "Preset", "Protocol",
    "ProxyOptions", "ResizeMode", "ServeOptions", "SmoothingOptions", "TrainSettings",
    "channel_values", "check_sampling", "check_sigma", "cli_fields", "command_flags",
    "default_of", "help_of", "option", "sigma_warning",
]  # fmt: skip
