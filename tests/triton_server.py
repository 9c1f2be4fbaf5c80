"""A real Triton Inference Server for the integration tests, through PyTriton (which ships the
`tritonserver` binary in its wheel). Runs in its own environment (.venv-triton: PyTriton pins
numpy < 2), so it imports nothing of bbsmooth and no torch: the model is a linear classifier
on the flattened [0,1] pixels, its weights given by the test in an .npz file.

Two models, as users configure them: `digits` takes FP32 [N,1,28,28] with max_batch_size 16;
`digits_u8` takes UINT8 [N,28,28,1] (NHWC, 0–255) with max_batch_size 8. Both answer N×10
FP32 scores. Triton lists the binary tensor extension and publishes each model's metadata and
configuration.

Usage: python tests/triton_server.py WEIGHTS.npz HTTP_PORT
"""

from __future__ import annotations

import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    weights = np.load(sys.argv[1])
    w, b = weights["w"].astype(np.float32), weights["b"].astype(np.float32)

    @batch
    def fp32(pixels: np.ndarray) -> dict[str, np.ndarray]:
        return {"scores": pixels.reshape(len(pixels), -1) @ w.T + b}

    @batch
    def uint8(pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = pixels.transpose(0, 3, 1, 2).reshape(len(pixels), -1).astype(np.float32) / 255.0
        return {"scores": x @ w.T + b}

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(sys.argv[2]),
        allow_grpc=False,
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        triton.bind(
            "digits",
            fp32,
            inputs=[Tensor(name="pixels", dtype=np.float32, shape=(1, 28, 28))],
            outputs=[Tensor(name="scores", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=16),
        )
        triton.bind(
            "digits_u8",
            uint8,
            inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(28, 28, 1))],
            outputs=[Tensor(name="scores", dtype=np.float32, shape=(10,))],
            config=ModelConfig(max_batch_size=8),
        )
        triton.serve()


if __name__ == "__main__":
    main()
