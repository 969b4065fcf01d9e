"""The Squeeze-and-Excitation gate of Hu et al. (arXiv 1709.01507), Eq. 2-4."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SEGate", "reduced_channels"]


def reduced_channels(channels: int, ratio: int) -> int:
    """Width of the bottleneck of a gate on ``channels`` channels: ``C // r``, at least 1."""
    return max(1, channels // ratio)


class SEGate(nn.Module):
    """``u * sigmoid(fc2(relu(fc1(mean_hw(u)))))`` on an NCHW tensor ``u``.

    ``fc1`` (C -> C/r) and ``fc2`` (C/r -> C) are 1x1 convolutions with biases, named as in
    timm's ``SEModule`` so that weights move between the two without renaming.
    """

    def __init__(self, channels: int, ratio: int = 16, *, device=None, dtype=None):
        super().__init__()
        rd = reduced_channels(channels, ratio)
        self.channels, self.ratio = channels, ratio
        self.fc1 = nn.Conv2d(channels, rd, kernel_size=1, bias=True, device=device, dtype=dtype)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, kernel_size=1, bias=True, device=device, dtype=dtype)
        self.gate = nn.Sigmoid()

    @torch.no_grad()
    def start_as_identity(self) -> None:
        """fc2 at zero: every channel is excited by sigmoid(0) = 0.5 until the gate learns
        (the layer before the gate is scaled by 2 to match; see se_inject.identity)."""
        self.fc2.weight.zero_()
        self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)          # squeeze, Eq. 2
        s = self.gate(self.fc2(self.act(self.fc1(s))))  # excitation, Eq. 3
        return x * s                               # scale, Eq. 4

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ratio={self.ratio}"
