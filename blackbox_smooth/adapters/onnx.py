"""`onnx:FILE.onnx`: a model file run by onnxruntime in this process (with its CUDA provider
when the device is CUDA and onnxruntime-gpu is installed).

What the model takes is read from its own input spec: the shape gives the layout (and a fixed
batch size or image size), the element type the dtype. The flags override it and add what a
spec cannot say (scale, per-channel mean and std, channel order). The file's digest and that
input convention identify the classifier, so its answers may be cached.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..blackbox import Answer
from ..digests import file_digest, fingerprint
from ..errors import ProtocolError, UsageError, warn
from ..inputs import check_file, memory_bytes
from ..options import EndpointOptions, InputDtype, Layout
from .local import _Local
from .modelinput import ModelInput, layout_of

INSTALL = "pip install 'blackbox_smooth[onnx]' (onnxruntime-gpu for CUDA)"
_DTYPES = {"tensor(float)": InputDtype.fp32, "tensor(uint8)": InputDtype.uint8}


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"onnx: endpoints need onnxruntime: {INSTALL}") from None
    return onnxruntime


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


class OnnxModel(_Local):
    """A `.onnx` classifier returning N×K scores (logits or probabilities) or N labels."""

    cache_by_default = True

    def __init__(self, path: str, device: torch.device, options: EndpointOptions) -> None:
        super().__init__()
        if not os.path.lexists(path):
            raise UsageError(f"ONNX file not found: {path}")
        check_file(path, "ONNX file", memory_bytes(), "an ONNX model file (.onnx)")
        ort = _runtime()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                warn("onnxruntime has no CUDA provider here: the model runs on the CPU")
        try:
            self.session = ort.InferenceSession(path, providers=providers)
        except Exception as e:
            raise UsageError(
                f"{path} is not an ONNX model onnxruntime can run: {_first_line(e)}"
            ) from None
        spec = self._input_spec(path, options.input_name)
        self.input_name = spec.name
        self.shape = list(spec.shape)
        dtype = options.input_dtype or _DTYPES.get(spec.type)
        if dtype is None:
            raise UsageError(
                f"{path} takes {spec.type} input; bbsmooth sends float32 or uint8: "
                "re-export the model with one of those"
            )
        self.input = ModelInput.of(options, layout_of(self.shape), dtype)
        outputs = [o.name for o in self.session.get_outputs()]
        if options.output is not None and options.output not in outputs:
            raise UsageError(f"{path} has no output {options.output!r} (it has {outputs})")
        self.output = options.output or outputs[0]
        fixed = self.shape[0] if isinstance(self.shape[0], int) and self.shape[0] > 0 else None
        self.max_batch = min(options.batch or 1024, fixed or 1024)
        self.description: dict[str, Any] = {
            "protocol": "onnx",
            "target": path,
            "sha256": file_digest(path, "ONNX file"),
            "input_name": self.input_name,
            "layout": self.input.layout,
            "dtype": self.input.dtype,
            "scale": self.input.wire_scale,
            **self.input.describe(),
            "output": self.output,
            "clip": [0.0, 1.0],
        }
        self.fingerprint = fingerprint(self.description)
        self._name = f"onnx:{path}"
        self._fixed_batch = fixed

    def _input_spec(self, path: str, name: str | None) -> Any:
        inputs = self.session.get_inputs()
        if name is not None:
            chosen = [i for i in inputs if i.name == name]
            if not chosen:
                names = [i.name for i in inputs]
                raise UsageError(f"{path} has no input {name!r} (it has {names})")
            return chosen[0]
        if len(inputs) != 1:
            names = [i.name for i in inputs]
            raise UsageError(f"{path} takes {len(inputs)} inputs {names}: pick one, --input-name")
        return inputs[0]

    def check_images(self, shape: tuple[int, ...]) -> None:
        """Refuse images the model's fixed input size cannot take, with what to do instead
        (onnxruntime's own message names tensor indices)."""
        c, h, w = shape
        spec = self.shape
        if self.input.layout == Layout.flat or len(spec) != 4:
            return
        want = spec[1:] if self.input.layout == Layout.nchw else [spec[3], spec[1], spec[2]]
        if any(
            isinstance(d, int) and d > 0 and d != v for d, v in zip(want, (c, h, w), strict=True)
        ):
            size = "x".join(str(d) for d in want[1:])
            raise UsageError(
                f"{self._name} takes {want[0]}×{size} images, these are {c}×{h}×{w}: "
                f"resize with --size {size}" + (", --grayscale" if want[0] == 1 else "")
            )
        self.input.check_channels(c)

    def _answer(self, images: torch.Tensor) -> Answer:
        self.check_images(tuple(images.shape[1:]))
        x = self.input.apply(images)
        if self._fixed_batch and len(x) < self._fixed_batch:  # a fixed batch: pad, then cut
            pad = np.zeros((self._fixed_batch - len(x), *x.shape[1:]), dtype=x.dtype)
            x = np.concatenate([x, pad])
        try:
            out = self.session.run([self.output], {self.input_name: x})[0]
        except Exception as e:
            raise UsageError(
                f"{self._name} failed on a batch of {tuple(images.shape[1:])} images: "
                f"{_first_line(e)} (check --input-layout, --input-dtype, --size)"
            ) from e
        out = np.asarray(out)[: len(images)]
        try:
            return Answer.from_output(out, len(images), self._name)
        except ProtocolError as e:  # the user's own model: theirs to fix, so a usage error
            raise UsageError(f"{e} (the model must output N×K scores or N labels)") from e
