"""The coordinator of BlackVIP / PEFTSmoothing's black-box setting: a frozen encoder and a
small trainable decoder that turns the encoding into an input-dependent prompt added to x.

No pre-trained encoder can be downloaded here, so the encoder is a fixed random convolutional
feature map (seeded, saved with the run); only the decoder trains.
"""

from __future__ import annotations

import torch
from torch import nn


class Coordinator(nn.Module):
    def __init__(self, channels: int, features: int = 32, hidden: int = 16) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, features, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        for p in self.encoder.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / max(1, p[0].numel())) ** 0.5)
            p.requires_grad_(False)
        self.decoder = nn.Sequential(
            nn.Conv2d(features, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )
        last = self.decoder[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)  # start as the identity front end
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prompt = self.decoder(self.encoder(x))
        prompt = nn.functional.interpolate(prompt, size=x.shape[-2:], mode="bilinear")
        return x + prompt
