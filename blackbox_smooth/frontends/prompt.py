"""A learned additive visual prompt: the whole image, or a frame `width` pixels wide."""

from __future__ import annotations

import torch
from torch import nn


class Prompt(nn.Module):
    def __init__(self, channels: int, height: int, width: int, frame: int = 0) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(channels, height, width))
        mask = torch.ones(1, height, width)
        if frame > 0:  # only a border of `frame` pixels is learned
            mask[:, frame : height - frame, frame : width - frame] = 0
        self.mask: torch.Tensor
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta * self.mask
