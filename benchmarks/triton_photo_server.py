"""Triton (PyTriton's `tritonserver`) serving a 224×224 classifier for benchmarks/realsize.py.

Runs in .venv-triton (no torch, no bbsmooth). The model `photo` takes FP32 [N,3,224,224]
(max_batch_size 64) and answers four scores, each channel's mean and their total: as cheap as
a model can be, so that what is timed is the protocol, not the model.

Usage: python benchmarks/triton_photo_server.py HTTP_PORT
"""

from __future__ import annotations

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    @batch
    def photo(pixels: np.ndarray) -> dict[str, np.ndarray]:
        means = pixels.mean(axis=(2, 3))
        return {"scores": np.concatenate([means, means.sum(1, keepdims=True)], 1)}

    config = TritonConfig(
        http_address="127.0.0.1", http_port=int(sys.argv[1]), allow_grpc=False, allow_metrics=False
    )
    with Triton(config=config) as triton:
        triton.bind(
            "photo",
            photo,
            inputs=[Tensor(name="pixels", dtype=np.float32, shape=(3, 224, 224))],
            outputs=[Tensor(name="scores", dtype=np.float32, shape=(4,))],
            config=ModelConfig(max_batch_size=64),
        )
        triton.serve()


if __name__ == "__main__":
    main()
