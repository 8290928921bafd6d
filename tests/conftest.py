"""Shared fixtures: a residual, batch-normalised model with non-trivial weights, and inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workers.demo.digits import DigitsNet
from workers.extraction.models import LoadedModel, load_model

FACTORY = "workers.demo.digits:digits_cnn"


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DigitsNet (residual blocks, BatchNorm) with seeded weights and running statistics,
    so that BatchNorm in eval mode is not the identity."""
    torch.manual_seed(1)
    model = DigitsNet()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None
            assert module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture
def model(random_weights: Path) -> LoadedModel:
    return load_model(FACTORY, str(random_weights))


def write_arrays(directory: Path, n: int, seed: int = 0) -> list[Path]:
    """n `.npy` inputs of DigitsNet's input shape, used as they are by the decoder."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = directory / f"{i:04d}.npy"
        np.save(path, rng.standard_normal((1, 28, 28)).astype(np.float32))
        paths.append(path)
    return paths


@pytest.fixture
def arrays(tmp_path: Path) -> list[Path]:
    return write_arrays(tmp_path / "inputs", 23)
