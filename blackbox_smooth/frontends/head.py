"""The output head: a few parameters after a front end's body, for zeroth-order training.

SPSA's variance grows with the number of parameters it moves, so on a whole denoiser (or even
a LoRA of one) 20,000 queries buy little. The head moves what a black box is most sensitive to
in a denoised image, with 6 parameters per channel: a colour mix and offset, how much detail to
restore (an unsharp mask: denoising blurs), and a tone curve. At zero it is the identity, so a
run starts exactly where its MSE-pre-trained body is.

`--method spsa` trains the head alone; `distill` trains the body and, once validation stops
improving, the head by SPSA on the queries it has left (its head stage).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# a 5×5 binomial blur: the unsharp mask's low-pass
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


class OutputHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(channels, channels))
        self.offset = nn.Parameter(torch.zeros(channels))
        self.detail = nn.Parameter(torch.zeros(channels))
        self.tone = nn.Parameter(torch.zeros(channels))
        self.kernel: torch.Tensor
        self.register_buffer("kernel", torch.outer(_BINOMIAL, _BINOMIAL), persistent=False)

    def _blur(self, y: torch.Tensor) -> torch.Tensor:
        c = y.shape[1]
        kernel = self.kernel.to(y.dtype).expand(c, 1, 5, 5)
        return F.conv2d(F.pad(y, (2, 2, 2, 2), mode="replicate"), kernel, groups=c)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        per_channel = (1, -1, 1, 1)
        y = y + torch.einsum("ij,njhw->nihw", self.mix, y) + self.offset.view(per_channel)
        y = y + self.detail.view(per_channel) * (y - self._blur(y))
        # y(1−y) is 0 at black and white: the curve bends the middle tones, not the ends
        return y + self.tone.view(per_channel) * y * (1 - y)


class WithHead(nn.Module):
    """A front end's body followed by its output head; one of the two trains, the head unless
    told otherwise (`distill` trains the body first, then the head: training/loop.py)."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.head = OutputHead(channels)
        # what the body trains of itself (a coordinator's encoder stays frozen)
        self._body_trains = [p.requires_grad for p in body.parameters()]
        self.train_only("head")

    def train_only(self, part: str) -> None:
        """Freeze all but `part` ("body": what of it trains of itself, or "head")."""
        for p, trains in zip(self.body.parameters(), self._body_trains, strict=True):
            p.requires_grad_(part == "body" and trains)
        for p in self.head.parameters():
            p.requires_grad_(part == "head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
