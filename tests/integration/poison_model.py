"""A model factory for the integration tests: the demo network with seeded weights, whose
forward kills its own process when an input holds the poison value. On PYTHONPATH of the
test workers only."""

from __future__ import annotations

import os
import signal

import torch

from workers.demo.digits import PREPROCESSING, DigitsNet

POISON = 1.0e4


class PoisonNet(DigitsNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x >= POISON).any()):
            os.kill(os.getpid(), signal.SIGKILL)  # what a segfaulting kernel looks like
        return super().forward(x)


def poison_net() -> PoisonNet:
    torch.manual_seed(0)
    return PoisonNet()


poison_net.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
