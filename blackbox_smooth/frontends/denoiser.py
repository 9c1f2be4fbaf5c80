"""A residual convolutional denoiser: output = noisy input − predicted noise (DnCNN-style)."""

from __future__ import annotations

import torch
from torch import nn


class Denoiser(nn.Module):
    def __init__(self, channels: int, width: int = 16, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)
