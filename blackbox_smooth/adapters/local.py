"""Classifiers that run in this process: a Python function or a TorchScript model file.

A local float classifier gets the noisy values unclipped, as in Cohen et al.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..blackbox import Answer
from ..digests import file_digest, fingerprint, module_digest
from ..endpoint import Endpoint
from ..errors import ProtocolError, UsageError, warn
from ..inputs import MAX_SOURCE_BYTES, check_file, memory_bytes
from ..options import PRESETS, InputDtype, Preset, channel_values
from .modelinput import ModelInput


def _input_description(model_input: ModelInput) -> dict[str, Any]:
    return {
        "layout": model_input.layout,
        "dtype": model_input.dtype,
        "scale": model_input.wire_scale,
        "clip": [0.0, 1.0],
        **model_input.describe(),
    }


class _Local:
    """Shared by local adapters: one call at a time (a thread lock, so any event loop or
    server thread may call), run off the event loop so that the next noise block can be
    drawn while the model runs."""

    cache_by_default = False
    max_batch: int
    # What one input value costs while the model runs: its float32 copies and the activations
    # it makes. votes.py sizes forward passes by it and --max-memory's share (256 MiB at the
    # default 1G): 13 images at 3×320×320, 27 at 224×224, --batch's 1,024 at 28×28. Measured
    # on a small ONNX model at 320×320 (one 8-channel convolution at full size, onnxruntime's
    # arena included): ~77 bytes a value; a deep model makes more, and --max-memory less.
    wire_bytes_per_value = 64
    transport = None  # no HTTP
    labels = None  # it answers class indices or scores itself
    annotate = None

    def __init__(self) -> None:
        self._lock = threading.Lock()

    async def classify(self, images: torch.Tensor) -> Answer:
        return await asyncio.to_thread(self.classify_sync, images)

    def classify_sync(self, images: torch.Tensor) -> Answer:
        with self._lock:
            return self._answer(images)

    def _answer(self, images: torch.Tensor) -> Answer:  # pragma: no cover - abstract
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def load_callable(target: str) -> tuple[Callable[..., Any], str]:
    """`FILE.py:FUNC` or `package.module:FUNC` → (function, digest of its source file)."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(
            f"python endpoint '{target}' must be python:FILE.py:FUNC or python:package.module:FUNC"
        )
    if path.endswith(".py"):
        if not os.path.lexists(path):
            raise UsageError(f"python endpoint file not found: {path}")
        check_file(path, "python endpoint file", MAX_SOURCE_BYTES, "a Python source file")
        spec = importlib.util.spec_from_file_location(f"bbsmooth_user_{abs(hash(path))}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"could not import {path}: {type(e).__name__}: {e}") from e
        source = path
    else:
        try:
            module = importlib.import_module(path)
        except Exception as e:
            raise UsageError(f"could not import module {path}: {type(e).__name__}: {e}") from e
        source = getattr(module, "__file__", None) or path
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{path} has no function named {name}")
    digest = file_digest(source, "python endpoint file") if os.path.isfile(source) else source
    return fn, digest


class PythonFunction(_Local):
    """`python:FILE.py:FUNC`: FUNC(float32 N×C×H×W numpy) → N labels or N×K scores.

    Not cached on disk by default: the function may read weights we cannot see, so its source
    digest does not prove that its answers are the same as last time.
    """

    def __init__(self, target: str, max_batch: int = 1024) -> None:
        super().__init__()
        self.fn, digest = load_callable(target)
        self.max_batch = max_batch
        self.description = {"protocol": "python", "target": target, "source_sha256": digest}
        self.fingerprint = fingerprint(self.description)
        self._name = f"python:{target}"

    def _answer(self, images: torch.Tensor) -> Answer:
        batch = images.detach().cpu().numpy()
        try:
            out = self.fn(batch)
        except Exception as e:
            raise UsageError(f"{self._name} raised {type(e).__name__}: {e}") from e
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        try:
            return Answer.from_output(out, len(batch), self._name)
        except ProtocolError as e:  # the user's own function: theirs to fix, so a usage error
            raise UsageError(f"{e} (FUNC must return N finite labels or N×K finite scores)") from e


class TorchModel(_Local):
    """A `torch.nn.Module` (or TorchScript) returning N×K logits; runs on `device`."""

    def __init__(
        self,
        model: torch.nn.Module,
        description: dict[str, Any],
        device: torch.device,
        max_batch: int = 1024,
        cache_by_default: bool = False,
        model_input: ModelInput | None = None,
    ) -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.device = device
        self.max_batch = max_batch
        # None: the noisy values go in unclipped (Cohen et al.); else clipped and mapped
        self.model_input = model_input
        if model_input is not None:
            description = {**description, "input": _input_description(model_input)}
        self.description = description
        self.fingerprint = fingerprint(description)
        self.cache_by_default = cache_by_default
        self._name = str(description.get("target", "torch model"))

    @classmethod
    def from_torchscript(
        cls,
        path: str,
        device: torch.device,
        max_batch: int = 1024,
        model_input: ModelInput | None = None,
    ) -> TorchModel:
        """`torch:FILE.pt`: the file's digest identifies the weights, so answers may be cached."""
        if not os.path.lexists(path):
            raise UsageError(f"TorchScript file not found: {path}")
        # a FIFO or a device is refused before torch (or the digest) would wait on it
        check_file(path, "TorchScript file", memory_bytes(), "a TorchScript file (.pt)")
        try:
            model = torch.jit.load(path, map_location=device)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"{path} is not a TorchScript file ({first}); save it with torch.jit.save"
            ) from e
        desc = {
            "protocol": "torch",
            "target": path,
            "sha256": file_digest(path, "TorchScript file"),
        }
        return cls(model, desc, device, max_batch, True, model_input)

    @classmethod
    def from_function(
        cls,
        target: str,
        device: torch.device,
        max_batch: int = 1024,
        adapter: str | None = None,
        model_input: ModelInput | None = None,
    ) -> TorchModel:
        """`torch:FILE.py:FUNC`: FUNC() returns a torch.nn.Module with its weights loaded; its
        source and state-dict digests identify it. With `adapter`, a LoRA run (peft) is applied
        on top, after checking that it was made for this very base model."""
        from ..lora import check_module, load_adapter

        fn, source = load_callable(target)
        try:
            model = fn()
        except Exception as e:
            raise UsageError(f"torch:{target} raised {type(e).__name__}: {e}") from e
        model = check_module(model, f"torch:{target}")
        desc: dict[str, Any] = {
            "protocol": "torch-module",
            "target": target,
            "source_sha256": source,
            "state_sha256": module_digest(model),
        }
        if adapter is not None:
            model, _ = load_adapter(model, adapter)
            weights = os.path.join(adapter, "adapter_model.safetensors")
            desc["adapter_sha256"] = file_digest(weights, "LoRA adapter weights")
        return cls(model, desc, device, max_batch, True, model_input)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.model_input is not None:  # mapped in numpy (a GPU model's batch goes via the CPU)
            return self.model(torch.from_numpy(self.model_input.apply(images)).to(self.device))
        return self.model(images.to(self.device, non_blocking=True))

    def _answer(self, images: torch.Tensor) -> Answer:
        try:
            out = self.logits(images)
        except Exception as e:
            # TorchScript errors carry the script's traceback: the last line says what failed
            lines = [line for line in str(e).splitlines() if line.strip()]
            last = lines[-1] if lines else ""
            kind = f"{type(e).__name__}: "
            if not last.startswith(kind):  # TorchScript's last line often names the type already
                last = kind + last
            raise UsageError(
                f"{self._name} failed on a batch of {tuple(images.shape[1:])} images: "
                f"{last} (does the model take images "
                "of this size and channel count? resize with --size HxW, --grayscale)"
            ) from e
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(images):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(f"{self._name} returned {shape}; expected N×K logits")
        if not bool(torch.isfinite(out).all()):
            raise UsageError(
                f"{self._name} returned NaN or infinite logits (check the model's weights and "
                "what it expects as input: [0,1] pixels with noise added)"
            )
        probs = torch.softmax(out.float(), dim=1).cpu().numpy()
        return Answer(probs.argmax(axis=1).astype(np.int64), probs)


def convention_hint(endpoint: Endpoint, flags: Any, box: Any, images: Sequence[np.ndarray]) -> None:
    """One warning line when a local tensor model (torch:, onnx:: a query costs nothing) told
    no normalisation (no --preset, --input-mean or --input-std) answers the first clean image
    differently as given and under --preset imagenet: most photo models take ImageNet-normalised
    values, and one fed [0,1] pixels answers nonsense, noise or not. Silent where it cannot tell
    (a grey image, a uint8 or rescaled input, a model that fails on the image: the run says)."""
    declared = flags.preset or flags.input_mean or flags.input_std
    # the box's convention: a torch model's `model_input`, an onnx model's `input`
    where = next((a for a in ("model_input", "input") if hasattr(box, a)), None)
    if declared or not images or not isinstance(box, _Local) or where is None:
        return
    given = getattr(box, where)
    base = given or ModelInput()
    if images[0].shape[0] != 3 or base.dtype != InputDtype.fp32 or base.wire_scale != 1.0:
        return
    mean, std, _, _ = PRESETS[Preset.imagenet]
    imagenet = replace(
        base, mean=channel_values("--input-mean", mean), std=channel_values("--input-std", std)
    )
    x = torch.from_numpy(np.ascontiguousarray(images[0][None], dtype=np.float32))
    with box._lock:  # the box's own call, twice, its convention swapped for the second
        try:
            raw = int(box._answer(x).labels[0])
            setattr(box, where, imagenet)
            normalised = int(box._answer(x).labels[0])
        except UsageError:
            return
        finally:
            setattr(box, where, given)
    if raw != normalised:
        warn(
            f"{endpoint} answers {raw} on the clean image as given but {normalised} under "
            "--preset imagenet: check the model's input convention (--preset, --input-mean, "
            "--input-std)"
        )
