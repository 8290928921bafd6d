"""A model factory for the deployment tests: the demo network, seeded, whose forward takes
a fixed extra time, so that a job lasts long enough to be interrupted mid-batch. On
PYTHONPATH of the test workers only."""

from __future__ import annotations

import time

import torch

from workers.demo.digits import PREPROCESSING, DigitsNet

DELAY_S = 0.3


class SlowNet(DigitsNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(DELAY_S)
        return super().forward(x)


def slow_net() -> SlowNet:
    torch.manual_seed(0)
    return SlowNet()


slow_net.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
