"""The bundled demo model: a small residual CNN for 28 x 28 grayscale digits."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.jobs import Preprocessing

__all__ = ["PREPROCESSING", "WEIGHTS", "DigitsNet", "digits_cnn"]

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
# MNIST's own mean and std of pixel intensity in [0, 1].
# Its outputs are the digits 0 to 9, in order; it reads images.
PREPROCESSING = Preprocessing(
    size=(28, 28),
    channels=1,
    mean=(0.1307,),
    std=(0.3081,),
    classes=tuple(str(d) for d in range(10)),
    input_kind="image",
)


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        out: torch.Tensor = self.relu(x + self.bn2(self.conv2(y)))
        return out


class DigitsNet(nn.Module):
    """conv1 (early: strokes and edges), block1/conv2/block2 (middle: parts), conv3 (last
    conv: digit-specific), fc (logits)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block1 = Residual(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.block2 = Residual(32)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.relu(self.bn1(self.conv1(x))))
        x = self.block2(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        logits: torch.Tensor = self.fc(self.flatten(self.pool(x)))
        return logits


def digits_cnn() -> DigitsNet:
    """Factory for `workers.demo.digits:digits_cnn`; weights come separately."""
    return DigitsNet()


# Factories may declare their preprocessing this way; the model loader reads it.
digits_cnn.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
