"""A hand-built conv net for the Grad-CAM tests: two stride-2 convs of known weights, a
channel-mixing 1x1 conv and a linear head, so that the gradient differs per channel and
per position (a global-pool head alone would give every position the same weight)."""

from __future__ import annotations

import torch
from torch import nn

from workers.jobs import Preprocessing

__all__ = ["HandNet", "hand_net", "hand_net_inplace"]


class HandNet(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU(inplace=inplace)
        self.mix = nn.Conv2d(8, 4, 1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        logits: torch.Tensor = self.head(self.flatten(self.mix(x)))
        return logits


def hand_net(inplace: bool = False) -> HandNet:
    """Seeded, so every load is the same network."""
    generator = torch.Generator().manual_seed(7)
    net = HandNet(inplace)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return net


hand_net.preprocessing = Preprocessing(  # type: ignore[attr-defined]
    size=(16, 16), channels=1, classes=("a", "b", "c", "d", "e"), input_kind="array"
)


def hand_net_inplace() -> HandNet:
    """The same network with in-place ReLUs, which change their input's storage."""
    return hand_net(inplace=True)


hand_net_inplace.preprocessing = hand_net.preprocessing  # type: ignore[attr-defined]
