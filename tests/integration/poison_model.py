"""A model factory for the integration tests: the demo network with seeded weights, whose
forward kills its own process when an input holds the poison value, and waits while the
file named by ACTMAP_TEST_HOLD exists when one holds the hold value (so that a test can
fault the cluster while that batch runs). On PYTHONPATH of the test workers only."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from workers.demo.digits import PREPROCESSING, DigitsNet

POISON = 1.0e4
HOLD = -1.0e4


class PoisonNet(DigitsNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x >= POISON).any()):
            os.kill(os.getpid(), signal.SIGKILL)  # what a segfaulting kernel looks like
        hold = os.environ.get("ACTMAP_TEST_HOLD")
        if hold and bool((x <= HOLD).any()):
            with Path(f"{hold}.started").open("a") as started:
                started.write(f"{os.getpid()}\n")  # one line per start of the batch
            while Path(hold).exists():
                time.sleep(0.05)
        return super().forward(x)


def poison_net() -> PoisonNet:
    torch.manual_seed(0)
    return PoisonNet()


poison_net.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
